"""Adaptive mixing on the hybrid core: SASR, AMFT, ReLIFT (mixers) and SRFT (an objective).

Each controller's required properties (monotone probability, limits equal to the plain methods in loss and gradient,
no generation on SFT steps, the right direction of mu on a crafted case, a buffer that fills with failed prompts),
exact resume of the controller state, SRFT's hand-computed per-token loss, and each tiny recipe end to end."""
from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file
from test_hybrids import assert_same_grads, first_step, raw_recipe

from posttrain.config import load_recipe, parse_recipe
from posttrain.experience import DEMO, POLICY, PROMPT, Experience, GroupOutcome
from posttrain.mixers import StepReport, build_mixer
from posttrain.trainer import Trainer, train

from conftest import REPO, read_metrics, tiny_recipe_overrides

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def toy(toy_reward):
    return toy_reward


OBJECTIVES = {"grpo": {"beta": 0.0, "aggregation": "token_mean"}, "sft": {}}


def mixed(model_dir, out, reward, mixer: dict, steps: int = 1, **stage) -> dict:
    return raw_recipe(model_dir, out, reward, OBJECTIVES,
                      {"objectives": {"grpo": 1.0, "sft": 1.0}, "mixer": mixer, "train": {"steps": steps}, **stage})


def alone(model_dir, out, reward, name: str) -> dict:
    return raw_recipe(model_dir, out, reward, OBJECTIVES, {"objectives": {name: 1.0}})


# ----------------------------------------------------------------------------------------------------------- SASR
def test_sasr_probability_is_monotone_in_the_gradient_norm_ratio():
    from posttrain.mixers.sasr import SASRConfig, sft_probability

    for gamma in (0.5, 2.0, 8.0):
        c = SASRConfig(gamma=gamma, kl_coef=1.0)
        ps = [sft_probability(c, r, 0.0) for r in (0.1, 0.5, 0.9, 1.0, 1.1, 2.0, 10.0)]
        assert all(a < b for a, b in zip(ps, ps[1:])) and ps[3] == pytest.approx(0.5)
        assert sft_probability(c, 1.0, 0.5) > sft_probability(c, 1.0, 0.0)          # more divergence: more SFT
    assert sft_probability(SASRConfig(min_probability=1.0, max_probability=1.0), 0.01, 0.0) == 1.0
    assert sft_probability(SASRConfig(min_probability=0.0, max_probability=0.0), 100.0, 9.0) == 0.0


@pytest.mark.parametrize("p, name", [(1.0, "sft"), (0.0, "grpo")])
def test_sasr_limits_are_pure_sft_and_pure_grpo(p, name, tiny_model_dir, tmp_path, toy):
    sasr = {"name": "sasr", "warmup_steps": 0, "min_probability": p, "max_probability": p}
    (ma, ga), (mb, gb) = first_step(mixed(tiny_model_dir, tmp_path / "a", toy(), sasr)), \
        first_step(alone(tiny_model_dir, tmp_path / "b", toy(), name))
    assert ma[f"mix/{name}"] == 1.0 and ma["loss"] == pytest.approx(mb["loss"], abs=1e-6)
    assert_same_grads(ga, gb)


def test_sasr_sft_steps_do_not_generate(tiny_model_dir, tmp_path, toy, monkeypatch):
    from posttrain.rollout.hf import HFEngine

    def refuse(*a, **k):
        raise AssertionError("an SFT step generated")
    monkeypatch.setattr(HFEngine, "generate", refuse)
    sasr = {"name": "sasr", "warmup_steps": 2, "min_probability": 1.0, "max_probability": 1.0}
    train(parse_recipe(mixed(tiny_model_dir, tmp_path, toy(), sasr, steps=4), "test"))
    rows = [r for r in read_metrics(tmp_path) if "loss" in r]
    assert [r["mix/sft"] for r in rows] == [1.0] * 4 and all("time/generate" not in r for r in rows)
    assert rows[-1]["mix/warmup_grad_norm"] == rows[1]["grad_norm"]                  # G_warmup: the last warm-up step


@pytest.mark.slow
def test_sasr_state_survives_resume_bitwise(tiny_model_dir, tmp_path, toy):
    sasr = {"name": "sasr", "warmup_steps": 2, "gamma": 4.0, "window": 2}
    raw = mixed(tiny_model_dir, tmp_path / "full", toy(), sasr, steps=8)
    raw["stages"][0]["train"] |= {"save_every": 4, "keep_checkpoints": 5}
    train(parse_recipe(raw, "test"))
    full = [r for r in read_metrics(tmp_path / "full") if "loss" in r]
    kinds = [r["mix/sft"] for r in full]
    assert 0.0 in kinds[2:] and 1.0 in kinds[2:], kinds                           # both kinds of step were drawn
    state = json.loads((tmp_path / "full/checkpoints/step-000004/trainer_state.json").read_text())["extras"]["mixer"]
    assert state["warmup_norm"] > 0 and len(state["rng"][1]) == 625
    raw["output_dir"] = str(tmp_path / "resumed")
    train(parse_recipe(raw, "test"), resume=str(tmp_path / "full/checkpoints/step-000004"))
    resumed = [r for r in read_metrics(tmp_path / "resumed") if "loss" in r]
    for a, b in zip(full[4:], resumed):
        for key in ("mix/sft", "mix/sft_probability", "loss", "grad_norm"):
            assert a[key] == b[key], key
    wa = load_file(str(tmp_path / "full/final/model.safetensors"))
    wb = load_file(str(tmp_path / "resumed/final/model.safetensors"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_median_split_recentres_advantages_on_the_token_median():
    from posttrain.rl.advantages import AdvantageInputs, AdvantageParams, compute_advantages, token_median

    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 1]], dtype=torch.float32)
    rewards, group = torch.tensor([1.0, 0.0, 0.0, 1.0]), torch.tensor([0, 0, 1, 1])
    plain, _ = compute_advantages("group_mean", AdvantageParams(), AdvantageInputs(rewards, mask, group))
    # row advantages 0.5, -0.5, -0.5, 0.5 with 3, 1, 2, 4 tokens: sorted -0.5 (3 tokens), 0.5 (7): the median is 0.5
    assert token_median(plain, mask) == 0.5
    split, _ = compute_advantages("group_mean", AdvantageParams(median_center=True),
                                  AdvantageInputs(rewards, mask, group))
    assert torch.equal(split, (plain - 0.5) * mask)
    assert (split[mask > 0] <= 0).all()                                               # G+ is empty, G- the rest


# ----------------------------------------------------------------------------------------------------------- AMFT
def test_amft_meta_derivative_sign():
    from posttrain.mixers.amft import meta_derivative

    # validation aligned with SFT (<g_val, g_sft> > <g_val, g_rl>): raising mu lowers L_val, dL/dmu < 0
    assert meta_derivative(1e-3, 5.0, 1.0) == pytest.approx(-4e-3)


def test_amft_validation_like_the_sft_data_pulls_mu_up(tiny_model_dir, tmp_path, toy):
    """The held-out demonstrations are drawn from the training distribution: the meta-gradient must raise mu."""
    amft = {"name": "amft", "warmup_steps": 0, "entropy_lr": 0.0, "meta_lr": 50.0, "meta_every": 1, "mu_init": 0.5}
    raw = mixed(tiny_model_dir, tmp_path, toy(), amft, steps=3)
    raw["eval"] = {"data": {"source": "task:arithmetic", "split": "train",
                            "task": {"digits": 1, "num_ops": 2, "ops": "+-", "num_examples": 256}}}
    train(parse_recipe(raw, "test"))
    rows = [r for r in read_metrics(tmp_path) if "loss" in r]
    assert all(r["mix/meta_derivative"] < 0 for r in rows)
    mus = [0.5] + [r["mix/mu"] for r in rows]
    assert all(b > a or b == 0.95 for a, b in zip(mus, mus[1:])) and mus[1] > mus[0], mus   # up, to the clip


def test_amft_without_learning_rates_keeps_mu(tiny_model_dir, tmp_path, toy):
    amft = {"name": "amft", "warmup_steps": 1, "entropy_lr": 0.0, "meta_lr": 0.0, "mu_init": 0.3}
    train(parse_recipe(mixed(tiny_model_dir, tmp_path, toy(), amft, steps=3), "test"))
    rows = [r for r in read_metrics(tmp_path) if "loss" in r]
    assert rows[0]["mix/sft"] == 1.0 and rows[0]["mix/grpo"] == 0.0                   # the warm-up step
    assert [r["mix/mu"] for r in rows] == [0.3] * 3 and rows[-1]["mix/sft"] == pytest.approx(0.3)


@pytest.mark.parametrize("mu, name", [(0.0, "grpo"), (1.0, "sft")])
def test_amft_at_mu_0_and_1_is_pure_rl_and_pure_sft(mu, name, tiny_model_dir, tmp_path, toy):
    amft = {"name": "amft", "warmup_steps": 0, "entropy_lr": 0.0, "meta_lr": 0.0, "mu_init": mu, "mu_min": mu,
            "mu_max": mu}
    (ma, ga), (mb, gb) = first_step(mixed(tiny_model_dir, tmp_path / "a", toy(), amft)), \
        first_step(alone(tiny_model_dir, tmp_path / "b", toy(), name))
    assert ma["loss"] == pytest.approx(mb["loss"], abs=1e-6)
    assert_same_grads(ga, gb)


def test_amft_entropy_term_moves_mu_toward_the_target():
    """mu <- mu + eta_H (H* - H_t): entropy below the target raises mu (the authors' code's sign)."""
    from posttrain.mixers.amft import AMFTConfig

    mixer = build_mixer(AMFTConfig(name="amft", warmup_steps=1, target_steps=1, meta_lr=0.0, entropy_lr=0.1),
                        {"sft": 1.0, "grpo": 1.0}, 0)
    assert mixer.plan(0).weights == {"sft": 1.0, "grpo": 0.0}
    mixer.observe(0, StepReport({"sft/entropy": 2.0}))
    mixer.observe(1, StepReport({"entropy": 1.0, "lr": 1e-3}))
    assert mixer.mu == pytest.approx(0.8 + 0.1 * (2.0 - 1.0)) and mixer.plan(2).weights["sft"] == pytest.approx(0.9)
    mixer.observe(2, StepReport({"entropy": 5.0, "lr": 1e-3}))
    assert mixer.mu == pytest.approx(0.6)


# --------------------------------------------------------------------------------------------------------- ReLIFT
def test_relift_buffers_failed_prompts_and_trains_on_the_oldest():
    from posttrain.mixers.relift import ReLIFTConfig

    mixer = build_mixer(ReLIFTConfig(name="relift", rl="grpo", sft="sft", buffer_size=3), {"grpo": 1.0, "sft": 1.0}, 0)
    assert mixer.plan(0).weights == {"grpo": 1.0, "sft": 0.0}
    outcomes = [GroupOutcome(7, [0.0, 0.0]), GroupOutcome(8, [0.0, 1.0]), GroupOutcome(9, [0.0, 0.0])]
    mixer.observe(0, StepReport({}, outcomes))
    assert mixer.buffer == [7, 9] and mixer.plan(1).demo_rows is None
    mixer.observe(1, StepReport({}, [GroupOutcome(3, [0.0, 0.0]), GroupOutcome(4, [0.0, 0.0])]))
    state = json.loads(json.dumps(mixer.state_dict()))
    plan = mixer.plan(2)
    assert plan.weights == {"grpo": 0.0, "sft": 1.0} and plan.demo_rows == (7, 9, 3) and mixer.buffer == [4]
    again = build_mixer(ReLIFTConfig(name="relift", rl="grpo", sft="sft", buffer_size=3), {"grpo": 1.0, "sft": 1.0}, 0)
    again.load_state_dict(state)
    assert again.plan(2).demo_rows == (7, 9, 3)                                       # the buffer is checkpointed
    never = build_mixer(ReLIFTConfig(name="relift", rl="grpo", sft="sft", buffer_size=-1), {"grpo": 1.0, "sft": 1.0}, 0)
    never.observe(0, StepReport({}, [GroupOutcome(i, [0.0]) for i in range(10)]))
    assert never.plan(1).weights == {"grpo": 1.0, "sft": 0.0}                          # -1: pure RL


def test_relift_sft_step_trains_on_the_failed_prompts_demonstrations(tiny_model_dir, tmp_path, toy, monkeypatch):
    """With a reward that is always 0 every group fails: after the first RL step (4 prompts) the buffer holds 4 rows and
    the next step is an SFT step on exactly their demonstrations, without generating."""
    from posttrain.sources.demos import DemoBuilder

    seen = []
    rows_of = DemoBuilder.rows
    monkeypatch.setattr(DemoBuilder, "rows", lambda self, rows: seen.append(rows) or rows_of(self, rows))
    raw = mixed(tiny_model_dir, tmp_path, toy("zero"), {"name": "relift", "rl": "grpo", "sft": "sft", "buffer_size": 4},
                steps=3)
    trainer = Trainer(parse_recipe(raw, "test"))
    trainer.run()
    rows = [r for r in read_metrics(tmp_path) if "loss" in r]
    assert [r["mix/sft"] for r in rows] == [0.0, 1.0, 0.0]
    assert "time/generate" in rows[0] and "time/generate" not in rows[1]
    from posttrain.data import EpochSampler

    prompts = trainer.data[0].prompts                                                 # the rollout sampler's order
    first = [prompts[i].row for i in EpochSampler(len(prompts), 0).indices(0, 4)]
    assert list(seen[0]) == first                                                     # the first step's 4 prompts


# ----------------------------------------------------------------------------------------------------------- SRFT
def test_srft_weights_at_zero_entropy_are_the_constants():
    from posttrain.objectives.srft import rl_weight, sft_weight

    h0 = torch.zeros(2, 3)
    adv = torch.tensor([[1.0, -1.0, 0.0], [2.0, 0.5, -0.1]])
    assert torch.equal(sft_weight(h0, 0.5, "negative"), torch.full((2, 3), 0.5))
    assert torch.equal(rl_weight(h0, adv, 0.1), torch.tensor([[0.1, 1.0, 1.0], [0.1, 0.1, 1.0]]))
    h = torch.tensor([[1.0, 2.0, 0.5]] * 2)
    assert torch.allclose(sft_weight(h, 0.5, "negative"), 0.5 * torch.exp(-h))
    assert torch.allclose(sft_weight(h, 0.5, "positive"), 0.5 * torch.exp(h))


def test_srft_per_token_loss_by_hand():
    """One group: a sampled row (A > 0 on its tokens) and the demonstration row; every term computed by hand."""
    from posttrain.config import _build_objective
    from posttrain.objectives import build_objective
    from posttrain.ops.logprobs import policy_entropy, selective_log_softmax
    from posttrain.policy import PolicyOutput

    srft = build_objective(_build_objective("srft", {"entropy_coef": 0.0}, "t"))
    torch.manual_seed(0)
    ids = torch.tensor([[5, 6, 1, 2], [5, 6, 3, 4]])
    source = torch.tensor([[PROMPT, PROMPT, POLICY, POLICY], [PROMPT, PROMPT, DEMO, DEMO]])
    exp = Experience(input_ids=ids, attention_mask=torch.ones(2, 4, dtype=torch.long),
                     loss_mask=(source != PROMPT).long(), source=source)
    exp.advantages = torch.tensor([0.5, -0.5])[:, None] * exp.target_mask
    logits = torch.randn(2, 3, 8, requires_grad=True)
    logp = selective_log_softmax(logits, exp.targets)
    losses, _ = srft(PolicyOutput(None, logp, entropy=policy_entropy(logits)), exp)
    probs = torch.softmax(logits.detach().double(), -1)
    h = -(probs * probs.log()).sum(-1)                                                # [2, 3] entropy
    p = logp.detach().double().exp()
    on = exp.target_mask.bool()
    expected_rl = torch.where(source[:, 1:] == DEMO, 0.5 * p / (p + 0.1),            # -A f(p), A = -0.5
                              -0.5 * 0.1 * torch.exp(h))                              # w_RL (-A r), r = 1, A = 0.5
    expected_sft = 0.5 * torch.exp(-h) * -logp.detach().double()
    assert torch.allclose(losses["loss"].detach().double()[on], expected_rl[on], atol=1e-6)
    assert torch.allclose(losses["sft"].detach().double()[1, 1:], expected_sft[1, 1:], atol=1e-6)


# --------------------------------------------------------------------------------------------------- tiny recipes
MECHANISM = {"sasr": ["mix/sft_probability", "mix/sft_fraction", "mix/warmup_grad_norm"],
             "amft": ["mix/mu", "mix/entropy_target", "mix/meta_derivative"],
             "srft": ["srft/sft_weight", "srft/rl_weight", "loss/srft/sft", "tokens/demo_frac"],
             "relift": ["mix/buffer_size", "mix/sft_fraction"]}


@pytest.mark.parametrize("name", sorted(MECHANISM))
def test_tiny_adaptive_recipe_runs_and_logs_its_mechanism(name, tiny_model_dir, tmp_path):
    overrides = tiny_recipe_overrides(tiny_model_dir, tmp_path / name) + [
        "data.task.num_examples=256", "eval.data.task.num_examples=32", "eval.num_samples=8", "train.log_every=1",
        "stages.0.train.steps=2", "stages.1.train.steps=3", "rollout.prompts_per_step=4", "train.batch_size=16"]
    overrides += {"sasr": ["stages.1.mixer.warmup_steps=1"], "relift": ["stages.1.mixer.buffer_size=4"],
                  "amft": ["stages.1.mixer.warmup_steps=1", "stages.1.mixer.meta_every=1",
                           "stages.1.train.batch_size=16"], "srft": []}[name]
    train(load_recipe(REPO / "recipes/tiny" / f"{name}.yaml", overrides))
    rows = [r for r in read_metrics(tmp_path / name) if r.get("stage") == 1 and "loss" in r]
    assert [r["step"] for r in rows] == [3, 4, 5] and all(math.isfinite(r["loss"]) for r in rows)
    for key in MECHANISM[name]:
        assert key in rows[-1] and math.isfinite(rows[-1][key]), key
