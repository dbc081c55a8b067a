"""Hybrid stages: demonstrations and rollouts in one step, per-source losses, mixers, and the four methods on top
(LUFFY, Prefix-RFT, CHORD, UFT).

Degenerate cases equal the plain methods on the same rollouts (losses and gradients, 1e-6); a constant mix of SFT and
GRPO has exactly the gradient of its weighted parts (each term a mean over its own source, scored at its own
temperature); hand-checked pieces; exact resume; 1 process == 2 processes; each tiny recipe end to end."""
from __future__ import annotations

import copy
import json
import math
import random

import pytest
import torch

from posttrain.config import load_recipe, parse_recipe
from posttrain.configlib import ConfigError
from posttrain.experience import DEMO, POLICY, PREFIX, PROMPT
from posttrain.trainer import Trainer, train

from conftest import REPO, read_metrics, tiny_recipe_overrides

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def toy(toy_reward):
    return toy_reward()


def raw_recipe(model_dir, out, reward: str, objectives: dict, stage: dict, rollout: dict | None = None) -> dict:
    """One stage on 2-step 1-digit chains (prompts with worked solutions); `stage` adds to {name, objectives, ...}."""
    return {
        "output_dir": str(out), "seed": 0, "model": {"path": str(model_dir)},
        "data": {"source": "task:arithmetic", "max_length": 48,
                 "task": {"digits": 1, "num_ops": 2, "ops": "+-", "num_examples": 256}},
        "objectives": objectives,
        "train": {"batch_size": 8, "micro_batch_size": 64, "log_every": 1, "steps": 1},
        "optim": {"lr": 1e-3, "weight_decay": 0.0}, "schedule": {"name": "constant", "warmup_steps": 0},
        "rollout": {"sampling": {"n": 4, "temperature": 1.0, "max_new_tokens": 24}, "prompts_per_step": 4,
                    **(rollout or {})},
        "rewards": [{"name": reward}],
        "logging": {"report_to": [], "progress_bar": False},
        "stages": [{"name": "hybrid", **stage}],
    }


def first_step(raw: dict) -> tuple[dict, list[dict[str, torch.Tensor]]]:
    """The metrics of the stage's first step and the gradient of each of its optimizer steps (before clipping)."""
    trainer = Trainer(parse_recipe(raw, "test"))
    run = trainer.setup_stage(0)
    grads, clip = [], trainer.clip

    def recording_clip(r):
        grads.append({n: p.grad.detach().clone() for n, p in trainer.model.named_parameters() if p.grad is not None})
        return clip(r)

    trainer.clip = recording_clip
    metrics = trainer.train_step(run)
    run.rollouts is not None and run.rollouts.close()
    return metrics, grads


def assert_same_grads(a: list[dict], b: list[dict], scale_b: float = 1.0, atol: float = 1e-6) -> None:
    assert len(a) == len(b) and a
    for ga, gb in zip(a, b):
        assert ga.keys() == gb.keys()
        for name in ga:
            assert torch.allclose(ga[name], scale_b * gb[name], atol=atol, rtol=1e-5), name


# ----------------------------------------------------------------------------------------- degenerate cases
def test_prefix_rft_with_every_rollout_unprefixed_is_grpo(tiny_model_dir, tmp_path, toy):
    grpo = raw_recipe(tiny_model_dir, tmp_path / "a", toy, {"grpo": {"beta": 0.0}}, {"objectives": {"grpo": 1.0}})
    prefix = raw_recipe(tiny_model_dir, tmp_path / "b", toy,
                        {"prefix_rft": {"prefixed": 0, "entropy_coef": 0.0, "dual_clip": None,
                                        "advantage": "group_zscore", "aggregation": "seq_mean_token_mean"}},
                        {"objectives": {"prefix_rft": 1.0}})
    (ma, ga), (mb, gb) = first_step(grpo), first_step(prefix)
    assert ma["loss"] == pytest.approx(mb["loss"], abs=1e-6) and ma["reward/mean"] == mb["reward/mean"]
    assert_same_grads(ga, gb)


@pytest.mark.parametrize("clip", [True, False])
def test_luffy_without_a_demonstration_is_dr_grpo(clip, tiny_model_dir, tmp_path, toy):
    """Two updates per rollout batch at a large lr, so the second one has r far from 1 and the clip settings
    matter."""
    rollout = {"mini_batch_size": 8}
    dr = {"dr_grpo": {"eps_low": 0.2, "eps_high": 0.2} if clip else {"eps_low": 0.999, "eps_high": 1e9}}
    luffy = {"luffy": {"demos_in_group": 0, "clip_policy": clip, "entropy_coef": 0.0, "eps_low": 0.2, "eps_high": 0.2}}
    runs = []
    for name, objectives in (("dr_grpo", dr), ("luffy", luffy)):
        raw = raw_recipe(tiny_model_dir, tmp_path / name, toy, objectives, {"objectives": {name: 1.0}}, rollout)
        raw["optim"]["lr"] = 0.05
        runs.append(first_step(raw))
    (ma, ga), (mb, gb) = runs
    assert ma["optimizer_steps"] == mb["optimizer_steps"] == 2
    assert ma["loss"] == pytest.approx(mb["loss"], abs=1e-6)
    assert_same_grads(ga, gb)
    clipped = mb["clip_ratio/low"] + mb["clip_ratio/high"]
    assert (clipped > 0) == clip and ma["ratio/mean"] != 1.0


def test_uft_without_a_hint_is_grpo(tiny_model_dir, tmp_path, toy):
    grpo = raw_recipe(tiny_model_dir, tmp_path / "a", toy, {"grpo": {"beta": 0.0, "aggregation": "token_mean"}},
                      {"objectives": {"grpo": 1.0}})
    uft = raw_recipe(tiny_model_dir, tmp_path / "b", toy,
                     {"uft": {"hint_probability": 0.0, "entropy_coef": 0.0, "beta": 0.0}}, {"objectives": {"uft": 1.0}})
    (ma, ga), (mb, gb) = first_step(grpo), first_step(uft)
    assert mb["tokens/prefix_frac"] == 0.0 and mb["hint/probability"] == 0.0
    assert ma["loss"] == pytest.approx(mb["loss"], abs=1e-6)
    assert_same_grads(ga, gb)


@pytest.mark.parametrize("mu, alone", [(0.0, "grpo"), (1.0, "sft")])
def test_chord_at_mu_0_is_grpo_and_at_mu_1_is_sft(mu, alone, tiny_model_dir, tmp_path, toy):
    objectives = {"grpo": {"beta": 0.0, "aggregation": "token_mean"}, "sft": {}}
    chord = raw_recipe(tiny_model_dir, tmp_path / "a", toy, objectives,
                       {"objectives": {"grpo": 1.0, "sft": 1.0}, "mixer": {"name": "chord", "mu": mu}})
    plain = raw_recipe(tiny_model_dir, tmp_path / "b", toy, objectives, {"objectives": {alone: 1.0}})
    (ma, ga), (mb, gb) = first_step(chord), first_step(plain)
    assert ma["mix/sft"] == mu and ma["mix/grpo"] == 1.0 - mu
    assert ("time/generate" in ma) == (alone == "grpo")           # mu = 1: no generation at all
    assert ma["loss"] == pytest.approx(mb["loss"], abs=1e-6)
    assert_same_grads(ga, gb)


def test_constant_mix_is_the_weighted_sum_of_its_parts(tiny_model_dir, tmp_path, toy):
    """{sft: 0.5, grpo: 1.0}: the SFT term is a mean over demonstration tokens (not diluted by rollout tokens) scored
    at T = 1, the GRPO term a mean over rollout tokens at the sampling temperature 0.7: the mixed gradient is exactly
    0.5 g_sft + g_grpo, each taken from a stage of that objective alone."""
    objectives = {"grpo": {"beta": 0.0, "aggregation": "token_mean"}, "sft": {}}
    rollout = {"sampling": {"n": 4, "temperature": 0.7, "max_new_tokens": 24}}
    runs = {}
    for name, weights in {"mix": {"sft": 0.5, "grpo": 1.0}, "sft": {"sft": 1.0}, "grpo": {"grpo": 1.0}}.items():
        raw = raw_recipe(tiny_model_dir, tmp_path / name, toy, objectives, {"objectives": weights}, rollout)
        raw["train"]["micro_batch_size"] = 3                          # several micro-batches per source
        runs[name] = first_step(raw)
    (mix, g_mix), (sft, g_sft), (grpo, g_grpo) = runs["mix"], runs["sft"], runs["grpo"]
    assert mix["loss/sft"] == pytest.approx(sft["loss/sft"], abs=1e-6)
    assert mix["loss/grpo"] == pytest.approx(grpo["loss/grpo"], abs=1e-6)
    assert mix["loss"] == pytest.approx(0.5 * sft["loss"] + grpo["loss"], abs=1e-6)
    assert mix["mix/sft"] == 0.5 and mix["mix/grpo"] == 1.0
    expected = [{n: 0.5 * g_sft[0][n] + g_grpo[0][n] for n in g_mix[0]}]
    assert_same_grads(g_mix, expected)


def test_hybrid_micro_batches_do_not_change_the_step(tiny_model_dir, tmp_path, toy):
    """SFT on demonstrations + LUFFY on rollouts with demonstrations inside: 1-row micro-batches give the loss and
    gradient of whole-batch ones (every term has its global normaliser)."""
    objectives = {"luffy": {}, "sft": {}}
    results = []
    for micro in (64, 1):
        raw = raw_recipe(tiny_model_dir, tmp_path / f"m{micro}", toy, objectives,
                         {"objectives": {"sft": 0.3, "luffy": 1.0}})
        raw["train"]["micro_batch_size"] = micro
        results.append(first_step(raw))
    (ma, ga), (mb, gb) = results
    assert ma["loss"] == pytest.approx(mb["loss"], abs=1e-6) and ma["tokens/demo_frac"] == mb["tokens/demo_frac"]
    assert_same_grads(ga, gb)


# ------------------------------------------------------------------------------------------ hand-checked pieces
def test_policy_shaping_gradient_matches_finite_differences():
    from posttrain.objectives.luffy import shaped

    gamma = 0.1
    for p0 in (0.01, 0.1, 0.5, 0.97):
        logp = torch.tensor(math.log(p0), dtype=torch.float64, requires_grad=True)
        shaped(logp.exp(), gamma).backward()
        h = 1e-6
        fd = (shaped(torch.tensor(math.log(p0) + h, dtype=torch.float64).exp(), gamma)
              - shaped(torch.tensor(math.log(p0) - h, dtype=torch.float64).exp(), gamma)) / (2 * h)
        assert float(logp.grad) == pytest.approx(float(fd), rel=1e-6)
        assert float(logp.grad) == pytest.approx(gamma * p0 / (p0 + gamma) ** 2, rel=1e-9)   # gamma p / (p + gamma)^2


def test_prefix_length_clamps():
    from posttrain.sources.guidance import prefix_length

    assert prefix_length(0.5, 10, 1) == 5 and prefix_length(0.0, 10, 1) == 1 and prefix_length(0.05, 10, 3) == 3
    assert prefix_length(1.0, 10, 1) == 9 and prefix_length(0.99, 10, 12) == 9      # never the whole demonstration
    assert prefix_length(0.7, 1, 1) == 0 and prefix_length(0.7, 0, 1) == 0


def test_prefix_ratio_bounds_follow_their_schedules_and_swap():
    from posttrain.schedules import Schedule
    from posttrain.sources.guidance import PrefixSampling, draw_ratio

    p = PrefixSampling(1, Schedule("cosine", start=0.9, end=0.1, steps=10), 0.5, 1, 0.0)
    assert p.bounds(0) == (0.5, 0.9) and p.bounds(5) == pytest.approx((0.5, 0.5)) and p.bounds(10) == (0.1, 0.5)
    rng = random.Random(0)
    assert all(0.1 <= draw_ratio(0.1, 0.5, rng) <= 0.5 for _ in range(100))


def test_schedules_at_their_boundaries():
    from posttrain.schedules import Schedule, schedule_value

    chord = Schedule("cosine", start=0.9, end=0.05, steps=200, warmup_steps=10)   # CHORD's mu(s)
    assert schedule_value(chord, 0) == 0.0 and schedule_value(chord, 5) == pytest.approx(0.45)
    assert schedule_value(chord, 10) == pytest.approx(0.9) and schedule_value(chord, 110) == pytest.approx(0.475)
    assert schedule_value(chord, 210) == pytest.approx(0.05) and schedule_value(chord, 10_000) == pytest.approx(0.05)
    uft = Schedule("cosine", start=0.95, end=0.05, steps=300, after=0.0)          # 0.05 + 0.45 (1 + cos(pi t / 300))
    for t in (0, 1, 150, 299, 300):
        assert schedule_value(uft, t) == pytest.approx(0.05 + 0.45 * (1 + math.cos(math.pi * t / 300)))
    assert schedule_value(uft, 301) == 0.0
    lin = Schedule("linear", start=1.0, end=0.0, steps=4)
    assert [schedule_value(lin, s) for s in range(6)] == [1.0, 0.75, 0.5, 0.25, 0.0, 0.0]
    assert schedule_value(Schedule("linear", start=2.0, end=1.0, steps=0), 0) == 1.0
    assert schedule_value(0.3, 17) == 0.3 and schedule_value(Schedule.constant(0.1), 9) == 0.1


def test_hint_draws_whole_steps_and_anneal():
    from posttrain.sources.guidance import draw_hint, hint_splits, solution_steps

    steps = solution_steps("1+2=3\n3+4=7\n7-5=2\n#### 2")
    assert hint_splits(len(steps), 5) == [0, 1, 2, 3, 4]
    rng = random.Random(0)
    ks = []
    for _ in range(400):
        hint = draw_hint(steps, 0.5, 5, rng)
        ks.append(next(k for k in range(5) if "".join(steps[:k]) == hint))      # always whole steps
    assert 1.8 < sum(ks) / len(ks) < 2.2                                         # E[k] = num p = 4 x 0.5
    assert draw_hint(steps, 0.0, 5, rng) == "" and draw_hint(steps, 1.0, 5, rng) == "".join(steps)


def test_entropy_selection_on_a_crafted_batch():
    """rho = 0.5 of the 4 prefix tokens: the two lowest-entropy ones (ties broken in row order) lose their advantage;
    continuation tokens keep theirs."""
    from types import SimpleNamespace

    from posttrain.experience import Experience
    from posttrain.rl.advantages import AdvantageParams
    from posttrain.schedules import Schedule
    from posttrain.sources.guidance import PrefixSampling, lowest_fraction
    from posttrain.sources.plan import RolloutPlan
    from posttrain.sources.rollouts import RolloutBuilder, StepLog

    assert lowest_fraction(torch.tensor([0.3, 0.1, 0.2, 0.1]), 0.5).tolist() == [False, True, False, True]
    assert lowest_fraction(torch.tensor([0.3, 0.1]), 0.0).tolist() == [False, False]
    source = torch.tensor([[PROMPT, PROMPT, PREFIX, PREFIX, POLICY, POLICY],
                           [PROMPT, PROMPT, PREFIX, PREFIX, POLICY, 0]])
    attention = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 0]])
    exp = Experience(input_ids=torch.zeros(2, 6, dtype=torch.long), attention_mask=attention,
                     loss_mask=(source != PROMPT).long() * attention, source=source)
    exp.advantages = torch.ones(2, 5) * exp.target_mask                          # [B, L]
    entropies = torch.tensor([[9.0, 0.5, 0.2, 9.0, 9.0], [9.0, 0.7, 0.2, 0.1, 9.0]])   # prefix targets at L = 1, 2
    builder = RolloutBuilder.__new__(RolloutBuilder)
    prefixes = PrefixSampling(1, 0.1, 0.9, 1, Schedule.constant(0.5))
    builder.plan = RolloutPlan("group_mean", AdvantageParams(), prefixes=prefixes)
    builder.world, builder.rank, builder.step, builder.log = 1, 0, 0, StepLog()
    builder.acc = SimpleNamespace()
    builder.mask_prefix_entropy(exp, entropies)
    assert exp.advantages.tolist() == [[0.0, 1.0, 0.0, 1.0, 1.0], [0.0, 1.0, 0.0, 1.0, 0.0]]
    assert builder.log.extra["prefix/entropy_masked"] == 0.5


# ----------------------------------------------------------------------------------------------- the contract
def test_objective_contract_is_checked_at_registration_and_build():
    from dataclasses import dataclass

    from posttrain.objectives.base import ObjectiveConfig, build_objective, register_objective, terms

    @dataclass(frozen=True)
    class C(ObjectiveConfig):
        pass

    with pytest.raises(TypeError, match=r"source.*must be one of demos, rollouts, got 'demo'"):
        register_objective("typo_source", C)(type("X", (), {"source": "demo"}))
    with pytest.raises(TypeError, match=r"reads rollouts and must define rollout_plan"):
        register_objective("no_plan", C)(type("Y", (), {"source": "rollouts"}))

    class Z:
        source, needs = "demos", frozenset({"refrence"})

        def __init__(self, config):
            self.config, self.terms = config, terms("token_mean", DEMO)

    register_objective("bad_needs_test", C)(Z)
    with pytest.raises(TypeError, match=r"unknown needs \['refrence'\]"):
        build_objective(C(type="bad_needs_test"))


def test_recipe_errors_name_the_stage(tiny_model_dir, tmp_path, toy):
    base = raw_recipe(tiny_model_dir, tmp_path, toy, {"luffy": {}, "grpo": {}, "sft": {}},
                      {"objectives": {"luffy": 1.0}})
    two_plans = copy.deepcopy(base)
    two_plans["stages"][0]["objectives"] = {"luffy": 1.0, "grpo": 1.0}
    with pytest.raises(ConfigError, match=r"stages\.0\.objectives: 'luffy' and 'grpo' both learn from rollouts"):
        parse_recipe(two_plans, "r.yaml")
    unknown = copy.deepcopy(base)
    unknown["stages"][0]["mixer"] = {"name": "chord", "rl": "luffy", "sft": "dft"}
    with pytest.raises(ConfigError, match=r"stages\.0\.mixer: names objective 'dft'"):
        parse_recipe(unknown, "r.yaml")
    unknown["stages"][0]["mixer"] = {"name": "cord"}
    with pytest.raises(ConfigError, match=r"stages\.0\.mixer\.name: unknown mixer 'cord'; registered: amft, chord, "
                                          r"constant, relift, sasr"):
        parse_recipe(unknown, "r.yaml")
    unknown["stages"][0]["mixer"] = {"name": "chord", "rl": "luffy", "mu": 1.5}
    with pytest.raises(ConfigError, match=r"stages\.0\.mixer\.mu: must stay within \[0, 1\]"):
        parse_recipe(unknown, "r.yaml")


@pytest.fixture
def no_model(monkeypatch):
    """Fail the test if the trainer gets as far as loading the model."""
    def refuse(*a, **k):
        raise AssertionError("the model was loaded before the data was checked")
    monkeypatch.setattr("posttrain.trainer.load_model", refuse)


def test_hybrid_data_without_demonstrations_stops_before_the_model(tiny_model_dir, tmp_path, toy, no_model):
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps({"question": f"What is {i} + 1?", "answer": str(i + 1)}) + "\n"
                            for i in range(8)))
    for name in ("luffy", "prefix_rft", "uft"):
        raw = raw_recipe(tiny_model_dir, tmp_path / name, toy, {name: {}}, {"objectives": {name: 1.0}})
        raw["data"] = {"source": str(data), "columns": {"prompt": "question", "answer": "answer"}, "max_length": 48}
        with pytest.raises(ConfigError, match=r"stages\.0\.data\.columns\.completion: the stage's rollout objective "
                                              r"puts demonstrations into its groups"):
            Trainer(parse_recipe(raw, "r.yaml"))
    chord = raw_recipe(tiny_model_dir, tmp_path / "chord", toy, {"grpo": {}, "sft": {}},
                       {"objectives": {"grpo": 1.0, "sft": 1.0}, "mixer": {"name": "chord"}})
    chord["data"] = {"source": str(data), "columns": {"prompt": "question", "answer": "answer"}, "max_length": 48}
    with pytest.raises(ConfigError, match=r"stages\.0\.data\.columns: '.*prompts\.jsonl' line 1 has no completion"):
        Trainer(parse_recipe(chord, "r.yaml"))


def test_demonstration_longer_than_the_rollout_budget_stops_before_the_model(tiny_model_dir, tmp_path, toy, no_model):
    raw = raw_recipe(tiny_model_dir, tmp_path, toy, {"luffy": {}}, {"objectives": {"luffy": 1.0}},
                     {"sampling": {"n": 4, "temperature": 1.0, "max_new_tokens": 6}})
    with pytest.raises(ConfigError, match=r"stages\.0\.data: the demonstration of prompt 0 .* longer than the rollout "
                                          r"budget rollout\.sampling\.max_new_tokens = 6"):
        Trainer(parse_recipe(raw, "r.yaml"))
    prefixed = raw_recipe(tiny_model_dir, tmp_path, toy, {"prefix_rft": {"prefixed": 5}},
                          {"objectives": {"prefix_rft": 1.0}})
    with pytest.raises(ConfigError, match=r"stages\.0\.rollout\.sampling\.n \(4\) must be at least the objective's "
                                          r"prefixed rollouts per prompt \(5\)"):
        Trainer(parse_recipe(prefixed, "r.yaml"))


# ------------------------------------------------------------------------------------ the experience itself
def test_luffy_groups_hold_the_demonstration_scored_like_the_rest(tiny_model_dir, tmp_path):
    raw = raw_recipe(tiny_model_dir, tmp_path, "exact", {"luffy": {}}, {"objectives": {"luffy": 1.0}})
    trainer = Trainer(parse_recipe(raw, "test"))
    run = trainer.setup_stage(0)
    exp, metrics = run.rollouts.collect(trainer.model, None, 0)
    assert len(exp) == 4 * 5 and metrics["reward/demo_mean"] == 1.0            # the worked solution is right
    demo_rows = (exp.source == DEMO).any(-1)
    assert demo_rows.tolist() == [False] * 4 + [True] + ([False] * 4 + [True]) * 3
    tok = trainer.tokenizer
    for i in demo_rows.nonzero().flatten().tolist():
        response = exp.input_ids[i][exp.source[i] == DEMO].tolist()
        assert response[-1] == tok.eos_token_id and tok.decode(response, skip_special_tokens=True) == \
            exp.columns[i]["solution"]
        assert torch.isnan(exp.sampler_logprobs[i][exp.source[i, 1:] == DEMO]).all()
    for i in range(len(exp)):                                                   # A_i = R_i - mean over all 5 rows
        same = exp.group == exp.group[i]
        expected = exp.rewards[i] - exp.rewards[same].mean()
        on = exp.target_mask[i] > 0
        assert torch.allclose(exp.advantages[i][on], expected.expand(int(on.sum())), atol=1e-6)
    run.rollouts.close()


def test_prefix_rft_rollouts_continue_demonstration_prefixes(tiny_model_dir, tmp_path):
    raw = raw_recipe(tiny_model_dir, tmp_path, "exact", {"prefix_rft": {"prefixed": 2, "low": 0.3, "high": 0.6,
                                                                         "entropy_mask": 0.5}},
                     {"objectives": {"prefix_rft": 1.0}})
    trainer = Trainer(parse_recipe(raw, "test"))
    run = trainer.setup_stage(0)
    exp, metrics = run.rollouts.collect(trainer.model, None, 0)
    tok = trainer.tokenizer
    assert len(exp) == 16 and metrics["prefix/low"] == 0.3 and metrics["prefix/high"] == 0.6
    assert 0.3 <= metrics["prefix/ratio"] <= 0.6 and 0 < metrics["tokens/prefix_frac"] < 1
    assert metrics["prefix/entropy_masked"] == pytest.approx(0.5, abs=0.1)
    for i in range(len(exp)):
        prefix = exp.input_ids[i][exp.source[i] == PREFIX].tolist()
        assert bool(prefix) == (i % 4 >= 2)                                     # rows 3 and 4 of each group
        if prefix:
            solution = tok(exp.columns[i]["solution"], add_special_tokens=False)["input_ids"]
            assert solution[: len(prefix)] == prefix and len(prefix) < len(solution)
            assert (exp.loss_mask[i].bool() == (exp.source[i] != PROMPT) & exp.attention_mask[i].bool()).all()
    # every prefix token either keeps the group advantage or was among the masked lowest-entropy half
    on = (exp.source[:, 1:] == PREFIX) & (exp.target_mask > 0)
    zeroed = (exp.advantages == 0) & on
    assert 0 < int(zeroed.sum()) <= int(on.sum())
    run.rollouts.close()


# -------------------------------------------------------------------------------------- resume and processes
def hybrid_stage_raw(model_dir, out, toy, steps: int = 4) -> dict:
    """SFT + Prefix-RFT mixed by CHORD's cosine mu, prefix bounds on schedules, entropy selection, 2 updates a step."""
    raw = raw_recipe(model_dir, out, toy,
                     {"sft": {}, "prefix_rft": {"prefixed": 2, "low": {"name": "linear", "start": 0.2, "end": 0.6,
                                                                         "steps": 4}, "high": 0.8,
                                                "entropy_mask": {"name": "linear", "start": 0.2, "end": 0.8,
                                                                 "steps": 4}}},
                     {"objectives": {"prefix_rft": 1.0, "sft": 1.0},
                      "mixer": {"name": "chord", "rl": "prefix_rft", "sft": "sft",
                                "mu": {"name": "cosine", "start": 0.8, "end": 0.1, "steps": 3, "warmup_steps": 1}},
                      "train": {"steps": steps, "micro_batch_size": 4}},
                     {"sampling": {"n": 4, "temperature": 1.0, "max_new_tokens": 14, "seed": 3}, "mini_batch_size": 8})
    raw["train"]["batch_size"] = 8
    return raw


def _rows(run_dir) -> list[dict]:
    return [r for r in read_metrics(run_dir) if "loss" in r]


@pytest.mark.slow
def test_hybrid_stage_resumes_exactly(tiny_model_dir, tmp_path, toy):
    from safetensors.torch import load_file

    raw = hybrid_stage_raw(tiny_model_dir, tmp_path / "full", toy)
    raw["stages"][0]["train"] |= {"save_every": 2, "keep_checkpoints": 5}
    train(parse_recipe(raw, "test"))
    full = _rows(tmp_path / "full")
    assert [r["step"] for r in full] == [1, 2, 3, 4]
    assert [r["mix/sft"] for r in full][0] == 0.0 and full[1]["mix/sft"] == pytest.approx(0.8)
    state = json.loads((tmp_path / "full/checkpoints/step-000002/trainer_state.json").read_text())
    assert state["extras"]["demos"]["cursor"] == 8 and state["extras"]["rollout"]["cursor"] == 8
    raw["output_dir"] = str(tmp_path / "resumed")
    train(parse_recipe(raw, "test"), resume=str(tmp_path / "full/checkpoints/step-000002"))
    resumed = _rows(tmp_path / "resumed")
    assert [r["step"] for r in resumed] == [3, 4]
    for a, b in zip(full[2:], resumed):
        for key in ("loss", "loss/sft", "loss/prefix_rft", "mix/sft", "prefix/ratio", "prefix/entropy_masked",
                    "reward/mean", "grad_norm"):
            assert a[key] == b[key], key
    wa = load_file(str(tmp_path / "full/final/model.safetensors"))
    wb = load_file(str(tmp_path / "resumed/final/model.safetensors"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["ddp", "zero2"])
def test_hybrid_stage_two_processes_match_one(mode, tiny_model_dir, tmp_path, toy):
    """The same hybrid stage (demonstrations split over the processes, prefixes drawn by position, the entropy
    selection over the whole batch) on 2 gloo processes gives the losses of 1 process."""
    from test_rl_loop import launch

    if mode != "ddp":
        pytest.importorskip("deepspeed")
    single = [r for r in launch(tmp_path, "single", hybrid_stage_raw(tiny_model_dir, tmp_path / "one", toy, 2))
              if "loss" in r]
    rows = launch(tmp_path, mode, hybrid_stage_raw(tiny_model_dir, tmp_path / "two", toy, 2), mode)
    assert rows[0]["world_size"] == 2
    double = [r for r in rows if "loss" in r]
    assert [r["step"] for r in single] == [r["step"] for r in double] == [1, 2]
    assert "loss/sft" in single[1] and "time/generate" in single[1]       # step 2 mixes both sources
    for a, b in zip(single, double):
        assert a["reward/mean"] == b["reward/mean"] and a["prefix/ratio"] == pytest.approx(b["prefix/ratio"])
        assert {k for k in a if k.startswith("loss")} == {k for k in b if k.startswith("loss")}
        for key in [k for k in a if k.startswith("loss")]:                # loss/sft only once mu > 0 (step 2)
            assert a[key] == pytest.approx(b[key], abs=1e-6), key
        assert a["prefix/entropy_masked"] == b["prefix/entropy_masked"]
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-5)


# ------------------------------------------------------------------------------------------------ tiny recipes
MECHANISM = {"luffy": ["tokens/demo_frac", "reward/demo_mean", "demo/prob", "loss/luffy/entropy"],
             "prefix_rft": ["tokens/prefix_frac", "prefix/ratio", "prefix/low", "prefix/high", "prefix/entropy_masked"],
             "chord": ["mix/grpo", "mix/sft", "loss/grpo", "loss/sft"],
             "chord_phi": ["mix/grpo", "mix/chord_phi", "chord_phi/phi"],
             "uft": ["tokens/prefix_frac", "hint/fraction", "hint/probability", "loss/uft/hint", "hint/nll"]}


@pytest.mark.parametrize("name", sorted(MECHANISM))
def test_tiny_hybrid_recipe_runs_and_logs_its_mechanism(name, tiny_model_dir, tmp_path):
    overrides = tiny_recipe_overrides(tiny_model_dir, tmp_path / name) + [
        "data.task.num_examples=256", "eval.data=null", "train.log_every=1", "stages.0.train.steps=2",
        "stages.1.train.steps=2", "rollout.prompts_per_step=4", "train.batch_size=16"]
    train(load_recipe(REPO / "recipes/tiny" / f"{name}.yaml", overrides))
    rows = [r for r in read_metrics(tmp_path / name) if r.get("stage") == 1 and "loss" in r]
    assert [r["step"] for r in rows] == [3, 4] and all(math.isfinite(r["loss"]) for r in rows)
    for key in MECHANISM[name]:
        assert key in rows[-1] and math.isfinite(rows[-1][key]), key


@pytest.mark.parametrize("name", ["luffy", "prefix_rft", "chord", "uft", "sasr", "amft", "srft", "relift"])
def test_gsm8k_hybrid_recipe_runs_offline(name, tiny_model_dir, tmp_path, gsm8k_dir):
    """Each GSM8K hybrid recipe as written (its columns, verifier, mixer), with the tiny model, the local GSM8K files
    and sizes shrunk to one step."""
    overrides = tiny_recipe_overrides(tiny_model_dir, tmp_path / name) + [
        f"data.source={gsm8k_dir / 'train.jsonl'}", "data.limit=8", "data.max_length=1024", "model.dtype=float32",
        "model.gradient_checkpointing=false", "model.precision=fp32", "train.micro_batch_size=8", "train.batch_size=4",
        "train.save_every=0", "stages.0.train.steps=1", "stages.0.train.epochs=null", "stages.0.train.eval_every=0",
        "rollout.prompts_per_step=2", "rollout.sampling.max_new_tokens=400",
        "rollout.mini_batch_size=null", "rollout.engine_args.batch_size=16"]
    per_method = {
        "chord": ["stages.0.train.batch_size=4"],
        "sasr": ["stages.0.train.batch_size=4", "stages.0.mixer.warmup_steps=0"],
        "amft": ["stages.0.train.batch_size=4", "stages.0.mixer.warmup_steps=0", "stages.0.mixer.entropy_lr=0",
                 "stages.0.mixer.meta_every=1", f"eval.data.source={gsm8k_dir / 'test.jsonl'}", "eval.data.limit=8",
                 "eval.num_samples=2", "eval.max_new_tokens=8"],
        "relift": ["stages.0.mixer.buffer_size=2"]}
    overrides += per_method.get(name, [])
    overrides += [] if name == "amft" else ["eval.data=null"]
    train(load_recipe(REPO / "recipes/gsm8k" / f"qwen2.5-0.5b-{name}.yaml", overrides))
    rows = [r for r in read_metrics(tmp_path / name) if "loss" in r]
    assert len(rows) == 1 and math.isfinite(rows[0]["loss"]) and "reward/gsm8k/mean" in rows[0]


def test_readme_extension_examples_run(tiny_model_dir, tmp_path, toy):
    """README's "Adding an objective" and "Adding a mixer" code, executed as written: the mixer alternates SFT-only
    steps
    (no generation) with RL steps, the objective trains on demonstrations; nothing else changes."""
    import re
    from dataclasses import dataclass

    from posttrain.configlib import field_doc
    from posttrain.experience import Experience
    from posttrain.mixers import MIXERS, MixerConfig, MixPlan, StepReport, register_mixer
    from posttrain.objectives import OBJECTIVES, ObjectiveConfig, register_objective
    from posttrain.objectives.base import terms
    from posttrain.policy import PolicyOutput

    readme = (REPO / "README.md").read_text()
    namespace = {"dataclass": dataclass, "field_doc": field_doc, "MixerConfig": MixerConfig, "MixPlan": MixPlan,
                 "StepReport": StepReport, "register_mixer": register_mixer, "ObjectiveConfig": ObjectiveConfig,
                 "register_objective": register_objective, "terms": terms, "DEMO": DEMO, "PolicyOutput": PolicyOutput,
                 "Experience": Experience}
    for heading in ("## Adding an objective", "## Adding a mixer"):
        section = readme[readme.index(heading):]
        exec(re.search(r"```python\n(.*?)```", section, re.S).group(1), namespace)
    try:
        _run_readme_examples(tiny_model_dir, tmp_path, toy)
    finally:                                     # leave the registries as the other tests expect them
        OBJECTIVES._items.pop("my_objective", None)
        MIXERS._items.pop("alternate", None)


def _run_readme_examples(tiny_model_dir, tmp_path, toy):
    raw = raw_recipe(tiny_model_dir, tmp_path, toy, {"my_objective": {}, "grpo": {"beta": 0.0}},
                     {"objectives": {"my_objective": 1.0, "grpo": 1.0},
                      "mixer": {"name": "alternate", "sft": "my_objective", "rl": "grpo"}, "train": {"steps": 2}})
    train(parse_recipe(raw, "test"))
    rows = [r for r in read_metrics(tmp_path) if "loss" in r]
    assert "time/generate" not in rows[0] and "my_objective/my_metric" in rows[0]
    assert "time/generate" in rows[1] and rows[1]["mix/grpo"] == 1.0
