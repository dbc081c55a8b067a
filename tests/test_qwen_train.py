"""Training on the random-weight Qwen fixtures (Qwen3's real tokenizer, 151,936-row vocabulary): SFT, DFT and GRPO
run, `posttrain eval` reads the export, the export reloads with plain transformers; LoRA through peft: the reference
is the base model with the adapters disabled, resume is exact, the adapter and merged exports reload to the same
logits, and 2 gloo processes (DDP, ZeRO-2) give the losses of 1."""
from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file
from test_rl_loop import launch
from transformers import AutoModelForCausalLM

from posttrain.config import parse_recipe
from posttrain.experience import DEMO, PREFIX
from posttrain.trainer import Trainer, train

from conftest import read_metrics

TOY_REWARD = '''
def length(prompts, completions, **kwargs):
    """Characters / 50: varies between the completions of a random model (its tokens are of every length)."""
    return [len(c) / 50 for c in completions]
'''
IDS = torch.tensor([[151644, 872, 198, 17, 10, 17, 30, 151645, 198, 151644, 77091, 198, 19, 151645]])


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_thread):
    """Every test here runs with one intra-op thread (conftest's one_thread)."""


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    path = tmp_path_factory.mktemp("rewards") / "toy_rewards.py"
    path.write_text(TOY_REWARD)
    return f"{path}:length"


def recipe(model_dir, out, objective: str, steps: int = 2, lora: dict | None = None, reward: str | None = None,
           **extra) -> dict:
    """A few steps of `objective` on 1-digit arithmetic (demonstrations, or rollouts with `reward`)."""
    rl = reward is not None
    spec = {"type": objective, "beta": 0.04} if rl else {"type": objective}
    raw = {
        "output_dir": str(out), "seed": 0, "model": {"path": str(model_dir), "lora": lora},
        "data": {"source": "task:arithmetic", "max_length": 64,
                 "task": {"digits": 1, "num_ops": 1, "ops": "+-", "num_examples": 64}},
        "objectives": {objective: spec},
        "train": {"batch_size": 8, "micro_batch_size": 4, "log_every": 1},
        "optim": {"lr": 1e-3, "weight_decay": 0.0}, "schedule": {"name": "constant", "warmup_steps": 0},
        "rollout": {"sampling": {"n": 4, "temperature": 1.0, "max_new_tokens": 8, "seed": 3}, "prompts_per_step": 2},
        "rewards": [{"name": reward}] if rl else None,
        "logging": {"report_to": [], "progress_bar": False},
        "stages": [{"name": objective, "objectives": {objective: 1.0}, "train": {"steps": steps}}],
    }
    for key, value in extra.items():
        raw[key] = value | raw.get(key, {}) if isinstance(value, dict) and key != "stages" else value
    return raw


def rows(run_dir) -> list[dict]:
    return [r for r in read_metrics(run_dir) if "loss" in r]


def logits_of(model) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(IDS).logits


# ------------------------------------------------------------------------------------------- full fine-tuning
@pytest.mark.parametrize("objective", ["sft", "dft"])
def test_demonstration_objectives_on_qwen3(objective, qwen3_model_dir, tmp_path):
    trainer = Trainer(parse_recipe(recipe(qwen3_model_dir, tmp_path, objective), "test"))
    trainer.run()
    got = rows(tmp_path)
    assert [r["step"] for r in got] == [1, 2] and all(math.isfinite(r["loss"]) for r in got)
    assert got[0]["loss"] == pytest.approx(math.log(151_936), rel=0.05) if objective == "sft" else True   # random init
    live = trainer.accelerator.unwrap_model(trainer.model)
    assert torch.equal(logits_of(live), logits_of(AutoModelForCausalLM.from_pretrained(tmp_path / "final")))


def test_grpo_on_qwen2_and_eval_of_its_export(qwen2_model_dir, tmp_path, toy, capsys):
    """GRPO with a KL term on the Qwen2 architecture; `posttrain eval` scores the exported directory."""
    from posttrain.cli import main

    train(parse_recipe(recipe(qwen2_model_dir, tmp_path / "run", "grpo", reward=toy), "test"))
    got = rows(tmp_path / "run")
    assert [r["step"] for r in got] == [1, 2]
    assert all(math.isfinite(r[k]) for r in got for k in ("loss", "kl", "entropy"))
    assert got[0]["entropy"] == pytest.approx(math.log(151_936), rel=0.02)   # a random model: near uniform
    assert main(["eval", str(tmp_path / "run/final"), "task:arithmetic", "num_samples=3", "max_new_tokens=4",
                 "data.task.digits=1", "data.task.num_examples=3"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["eval/num_samples"] == 3


# ------------------------------------------------------------------------------------------------------ LoRA
LORA = {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj", "down_proj"]}


def test_lora_reference_is_the_base_model(qwen3_model_dir):
    """pi_ref of a LoRA policy = the same PeftModel with its adapters disabled: its log-probs are the base model's
    (bitwise), while the adapted policy's differ; no parameter is registered on the reference."""
    from posttrain.experience import Experience
    from posttrain.models import AdapterDisabledReference, LoraSettings, ModelConfig, load_model
    from posttrain.policy import forward

    policy = load_model(str(qwen3_model_dir), ModelConfig(path=str(qwen3_model_dir), lora=LoraSettings(**LORA)))
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.5)                                           # as after training: B != 0
    ref = AdapterDisabledReference(policy)
    base = AutoModelForCausalLM.from_pretrained(qwen3_model_dir).eval()
    exp = Experience(input_ids=IDS, attention_mask=torch.ones_like(IDS), loss_mask=torch.ones_like(IDS), source=IDS)
    policy.train()
    with torch.no_grad():
        a, b, c = forward(ref, exp), forward(base, exp), forward(policy, exp)
    assert torch.equal(a.logprobs, b.logprobs) and not torch.allclose(a.logprobs, c.logprobs)
    assert list(ref.parameters()) == [] and policy.training                  # no copy; the policy's mode restored


def _lora_sft(model_dir, out, steps: int, **train_extra) -> dict:
    raw = recipe(model_dir, out, "sft", steps=steps, lora=LORA | {"merge": True})
    raw["stages"][0]["train"] |= train_extra
    return raw


def test_lora_resume_is_exact_and_exports_reload(qwen3_model_dir, tmp_path):
    """SFT with LoRA: only adapters train; resuming from a mid-stage checkpoint gives the uninterrupted run's losses
    and adapter bitwise; the adapter (peft / transformers) and the merged export reload to the live model's logits."""
    from peft import PeftModel

    full = Trainer(parse_recipe(_lora_sft(qwen3_model_dir, tmp_path / "full", 4, save_every=2, keep_checkpoints=3),
                                "test"))
    full.run()
    train(parse_recipe(_lora_sft(qwen3_model_dir, tmp_path / "resumed", 4), "test"),
          resume=str(tmp_path / "full/checkpoints/step-000002"))
    a, b = rows(tmp_path / "full"), rows(tmp_path / "resumed")
    assert [r["step"] for r in b] == [3, 4] and [r["loss"] for r in a[2:]] == [r["loss"] for r in b]
    wa, wb = (load_file(str(tmp_path / d / "final/adapter_model.safetensors")) for d in ("full", "resumed"))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert all("lora_" in k for k in wa) and any(v.abs().sum() > 0 for k, v in wa.items() if "lora_B" in k)
    live = logits_of(full.accelerator.unwrap_model(full.model))
    base = AutoModelForCausalLM.from_pretrained(qwen3_model_dir)
    assert not torch.allclose(live, logits_of(base))                         # the adapters changed the model
    adapter = PeftModel.from_pretrained(base, tmp_path / "full/final")
    assert torch.equal(live, logits_of(adapter))
    via_transformers = AutoModelForCausalLM.from_pretrained(tmp_path / "full/final")   # reads adapter_config.json
    assert torch.equal(live, logits_of(via_transformers))
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "full/final/merged")
    torch.testing.assert_close(logits_of(merged), live, atol=1e-4, rtol=1e-4)     # W + BA folded: float rounding only


def test_lora_grpo_with_kl_to_the_base(qwen3_model_dir, tmp_path, toy):
    """GRPO with LoRA on the hf engine: the KL is measured against the adapter-disabled base (no reference copy and
    no references/ directory), zero at the first step and not after an update."""
    trainer = Trainer(parse_recipe(recipe(qwen3_model_dir, tmp_path, "grpo", steps=2, lora=LORA, reward=toy), "test"))
    trainer.run()
    got = rows(tmp_path)
    assert got[0]["kl"] == pytest.approx(0.0, abs=1e-6) and got[1]["kl"] > 0
    assert not (tmp_path / "references").exists() and (tmp_path / "final/adapter_config.json").is_file()


@pytest.fixture(scope="module")
def lora_grpo_one_process(qwen3_model_dir, tmp_path_factory, toy) -> list[dict]:
    out = tmp_path_factory.mktemp("lora-one")
    raw = recipe(qwen3_model_dir, out / "run", "grpo", steps=2, lora=LORA, reward=toy)
    return [r for r in launch(out, "one", raw) if "loss" in r]


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["ddp", "zero2"])
def test_lora_grpo_two_processes_match_one(mode, lora_grpo_one_process, qwen3_model_dir, tmp_path, toy):
    """LoRA GRPO with a KL term on 2 real CPU processes (DDP, DeepSpeed ZeRO-2 over gloo) = 1 process."""
    if mode != "ddp":
        pytest.importorskip("deepspeed")
    raw = recipe(qwen3_model_dir, tmp_path / "run", "grpo", steps=2, lora=LORA, reward=toy)
    logged = launch(tmp_path, mode, raw, mode)
    single, double = lora_grpo_one_process, [r for r in logged if "loss" in r]
    assert logged[0]["world_size"] == 2                                       # two real processes
    assert [r["step"] for r in single] == [r["step"] for r in double] == [1, 2]
    for a, b in zip(single, double):
        assert a["reward/mean"] == b["reward/mean"]
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-6) and a["kl"] == pytest.approx(b["kl"], abs=1e-6)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-5) and a["grad_norm"] > 0


# ----------------------------------------------------------------------------------------- the fused LM head
def test_fused_head_equals_the_full_logits_path(qwen3_model_dir):
    """At the real vocabulary (small width): the fused head's log-probs, entropy and every parameter's gradient equal
    the full-logits path's (the model's own head, then log_softmax)."""
    from posttrain.experience import Experience
    from posttrain.policy import forward

    model = AutoModelForCausalLM.from_pretrained(qwen3_model_dir, dtype=torch.float32)
    ids = torch.cat([IDS, IDS.flip(1)])
    exp = Experience(input_ids=ids, attention_mask=torch.ones_like(ids), loss_mask=torch.ones_like(ids), source=ids)
    weight = torch.randn(exp.targets.shape, generator=torch.Generator().manual_seed(0))
    outs, grads = [], []
    for logits in (False, True):
        model.zero_grad()
        out = forward(model, exp, temperature=0.7, logits=logits, entropy=True)
        (out.logprobs * weight).sum().backward()
        outs.append(out)
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    fused, full = outs
    assert fused.logits is None and full.logits.shape == (2, IDS.shape[1] - 1, 151_936)
    torch.testing.assert_close(fused.logprobs, full.logprobs, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fused.entropy, full.entropy, atol=1e-5, rtol=1e-5)
    for name, g in grads[1].items():
        torch.testing.assert_close(grads[0][name], g, atol=1e-5, rtol=1e-4, msg=name)


# ---------------------------------------------------------------------------------------- the GSM8K recipes
@pytest.mark.parametrize("name", ["sft", "grpo"])
def test_gsm8k_recipe_runs_on_the_qwen_fixture(name, qwen2_model_dir, gsm8k_dir, tmp_path):
    """recipes/gsm8k as written, with only the model path, the data files (no hub here) and sizes overridden. Their
    bf16 precision needs a fresh accelerate state in this process (the singleton keeps the first run's)."""
    from accelerate.state import AcceleratorState

    from posttrain.config import load_recipe

    from conftest import REPO, tiny_recipe_overrides

    overrides = tiny_recipe_overrides(qwen2_model_dir, tmp_path) + [
        f"data.source={gsm8k_dir / 'train.jsonl'}", f"eval.data.source={gsm8k_dir / 'test.jsonl'}", "data.limit=16",
        "stages.0.train.steps=2", "stages.0.train.epochs=null", "eval.num_samples=2", "eval.max_new_tokens=8",
        "train.log_every=1"]
    overrides += (["train.batch_size=4", "train.micro_batch_size=2"] if name == "sft" else
                  ["rollout.prompts_per_step=2", "rollout.sampling.n=2", "rollout.sampling.max_new_tokens=8",
                   "train.micro_batch_size=4"])
    AcceleratorState._reset_state(reset_partial_state=True)
    try:
        train(load_recipe(REPO / f"recipes/gsm8k/qwen2.5-0.5b-{name}.yaml", overrides))
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)           # later tests start from "no" precision
    got = rows(tmp_path)
    assert [r["step"] for r in got] == [1, 2] and all(math.isfinite(r["loss"]) for r in got)
    assert got[-1]["eval/num_samples"] == 2


# --------------------------------------------------------------------------------------------------- hybrids
THINK = "<think>\n\n</think>\n\n"     # Qwen3's template opens the last assistant turn with it (no reasoning given)


def _hybrid(model_dir, out, objectives: dict, stage: dict, lora: dict | None = None) -> dict:
    raw = recipe(model_dir, out, "sft", lora=lora, reward="exact",
                 stages=[{"name": "hybrid", "train": {"steps": 2, "micro_batch_size": 5}, **stage}])
    raw["objectives"] = {"sft": {"type": "sft"}, **objectives}
    raw["rollout"]["sampling"]["max_new_tokens"] = 16              # the chat-formatted answers are up to 15 tokens
    return raw


def test_demonstrations_in_groups_and_prefixes_follow_the_chat_template(qwen3_model_dir, tmp_path):
    """On Qwen3's chat template: the demonstration a LUFFY group holds is the answer as the template renders it after
    the rollout prompt (an empty think block, the answer, <|im_end|>), teacher-forced (no sampler log-probs) and
    scored 1 by `exact`; Prefix-RFT's prefixes are leading tokens of that response, continued by the policy."""
    raw = _hybrid(qwen3_model_dir, tmp_path, {"luffy": {}, "prefix_rft": {"prefixed": 2, "low": 0.3, "high": 0.6}},
                  {"objectives": {"luffy": 1.0}})
    raw["stages"].append({"name": "prefix", "objectives": {"prefix_rft": 1.0},
                          "train": {"steps": 1, "micro_batch_size": 4}})
    trainer = Trainer(parse_recipe(raw, "test"))
    tok, im_end = trainer.tokenizer, trainer.tokenizer.convert_tokens_to_ids("<|im_end|>")
    run = trainer.setup_stage(0)
    exp, metrics = run.rollouts.collect(trainer.model, None, 0)
    run.rollouts.close()
    demo_rows = (exp.source == DEMO).any(-1)
    assert metrics["reward/demo_mean"] == 1.0 and demo_rows.tolist() == ([False] * 4 + [True]) * 2
    for i in demo_rows.nonzero().flatten().tolist():
        response = exp.input_ids[i][exp.source[i] == DEMO].tolist()
        assert response[-1] == im_end and tok.decode(response[:-1]) == THINK + exp.columns[i]["solution"]
        assert torch.isnan(exp.sampler_logprobs[i][exp.source[i, 1:] == DEMO]).all()

    run = trainer.setup_stage(1)
    exp, metrics = run.rollouts.collect(trainer.model, None, 0)
    run.rollouts.close()
    assert 0 < metrics["tokens/prefix_frac"] < 1
    for i in range(len(exp)):
        prefix = tok.decode(exp.input_ids[i][exp.source[i] == PREFIX].tolist())
        assert bool(prefix) == (i % 4 >= 2)                                     # the last 2 rollouts of each group
        response = THINK + exp.columns[i]["solution"]
        assert response.startswith(prefix) and len(prefix) < len(response)


def test_a_hybrid_stage_trains_lora_on_qwen3(qwen3_model_dir, tmp_path):
    """SFT + LUFFY mixed by CHORD's mu, with LoRA on Qwen3: both terms are logged with their weights, the adapter
    trains and its export reloads to the live model's logits."""
    raw = _hybrid(qwen3_model_dir, tmp_path, {"luffy": {}},
                  {"objectives": {"luffy": 1.0, "sft": 1.0},
                   "mixer": {"name": "chord", "rl": "luffy", "sft": "sft",
                             "mu": {"name": "linear", "start": 0.9, "end": 0.1, "steps": 2}}}, lora=LORA)
    trainer = Trainer(parse_recipe(raw, "test"))
    trainer.run()
    got = rows(tmp_path)
    assert [r["step"] for r in got] == [1, 2]
    assert [r["mix/sft"] for r in got] == pytest.approx([0.9, 0.5]) and [r["mix/luffy"] for r in got] == \
        pytest.approx([0.1, 0.5])
    assert all(math.isfinite(r[k]) for r in got for k in ("loss", "loss/sft", "loss/luffy", "reward/demo_mean"))
    live = logits_of(trainer.accelerator.unwrap_model(trainer.model))
    assert not torch.allclose(live, logits_of(AutoModelForCausalLM.from_pretrained(qwen3_model_dir)))
    assert torch.equal(live, logits_of(AutoModelForCausalLM.from_pretrained(tmp_path / "final")))   # the adapter
