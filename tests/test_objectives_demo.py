"""The demonstration-only objectives: DFT, ASFT, OTR (posttrain/objectives/{dft,asft,otr}.py).

Run: /work/venv/bin/pytest tests/test_objectives_demo.py -q
"""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from posttrain.experience import Experience
from posttrain.objectives import aggregate, build_objective
from posttrain.objectives.asft import ASFTConfig
from posttrain.objectives.dft import DFTConfig
from posttrain.objectives.otr import OTRConfig
from posttrain.ops.logprobs import selective_log_softmax
from posttrain.policy import PolicyOutput

REPO = Path(__file__).resolve().parents[1]


def _batch(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor | None = None):
    """PolicyOutput + Experience for logits [B, L, V] predicting targets [B, L] (a dummy first token in front)."""
    b, length = targets.shape
    ids = torch.cat([torch.zeros(b, 1, dtype=torch.long), targets], 1)                     # [B, L+1]
    loss_mask = torch.cat([torch.zeros(b, 1), torch.ones(b, length) if mask is None else mask], 1).long()
    exp = Experience(input_ids=ids, attention_mask=torch.ones_like(ids), loss_mask=loss_mask,
                     source=torch.zeros_like(ids))
    return PolicyOutput(logits=logits, logprobs=selective_log_softmax(logits, targets)), exp


# Tiny vocabulary V = 3, one sequence, two completion positions:
#   t=0: logits ln[1, 2, 5] -> pi = [0.125, 0.25, 0.625], target 2 (p = 0.625)
#   t=1: logits ln[1, 1, 2] -> pi = [0.25, 0.25, 0.5],    target 0 (p = 0.25)
# pi_ref: t=0 ln[2, 1, 1] -> [0.5, 0.25, 0.25];  t=1 equal to pi.
LOGITS = torch.log(torch.tensor([[[1.0, 2.0, 5.0], [1.0, 1.0, 2.0]]]))
REF_LOGITS = torch.log(torch.tensor([[[2.0, 1.0, 1.0], [1.0, 1.0, 2.0]]]))
TARGETS = torch.tensor([[2, 0]])


def test_dft_hand_computed():
    # -p ln p: 0.625 * 0.4700036292 = 0.2937522683;  0.25 * 1.3862943611 = 0.3465735903 (by hand)
    out, exp = _batch(LOGITS, TARGETS)
    loss, metrics = build_objective(DFTConfig(type="dft"))(out, exp)
    torch.testing.assert_close(loss, torch.tensor([[0.2937522683, 0.3465735903]]))
    torch.testing.assert_close(aggregate(loss, exp.target_mask, "token_mean"), torch.tensor(0.3201629293))
    torch.testing.assert_close(metrics["p"], torch.tensor(0.4375))


@pytest.mark.parametrize("direction,kl0", [
    # KL(ref||pi) at t=0: 0.5 ln(0.5/0.125) + 0.25 ln(1) + 0.25 ln(0.25/0.625) = 0.6931471806 - 0.2290726830
    ("ref_to_policy", 0.4640744976),
    # KL(pi||ref) at t=0: 0.125 ln(0.125/0.5) + 0.25 ln(1) + 0.625 ln(0.625/0.25) = -0.1732867951 + 0.5726817074
    ("policy_to_ref", 0.3993949123),
])
def test_asft_hand_computed(direction, kl0):
    out, exp = _batch(LOGITS, TARGETS)
    exp.ref_logits = REF_LOGITS
    loss, metrics = build_objective(ASFTConfig(type="asft", kl_coef=0.1, kl_direction=direction))(out, exp)
    # DFT term + 0.1 * KL; KL is 0 at t=1 where pi_ref == pi
    torch.testing.assert_close(loss, torch.tensor([[0.2937522683 + 0.1 * kl0, 0.3465735903]]))
    torch.testing.assert_close(metrics["kl"], torch.tensor(kl0 / 2))


def test_otr_hand_computed(monkeypatch):
    """Fixed samples (the sampler is tested in test_logprobs.py), K = 4, beta = -0.5:
    t=0 (target 2) samples [2, 2, 0, 1], R = [1, 1, -.5, -.5], log pi = [ln .625, ln .625, ln .125, ln .25]
        sum R log pi = -0.9400072584 + 1.0397207708 + 0.6931471806 = 0.7928606930 -> loss -0.1982151733
    t=1 (target 0) samples [0, 2, 2, 2], R = [1, -.5, -.5, -.5], log pi = [ln .25, ln .5, ln .5, ln .5]
        sum R log pi = -1.3862943611 + 1.0397207708 = -0.3465735903 -> loss 0.0866433976"""
    import posttrain.objectives.otr as otr

    samples = torch.tensor([[[2, 2, 0, 1], [0, 2, 2, 2]]])
    seen = {}

    def fixed(logits, k, temperature, mask):
        seen.update(k=k, temperature=temperature)
        return samples

    monkeypatch.setattr(otr, "sample_tokens", fixed)
    out, exp = _batch(LOGITS, TARGETS)
    loss, metrics = build_objective(OTRConfig(type="otr", num_samples=4, temperature=1.5, beta=-0.5))(out, exp)
    torch.testing.assert_close(loss, torch.tensor([[-0.1982151733, 0.0866433976]]))
    torch.testing.assert_close(metrics["hit_rate"], torch.tensor((0.5 + 0.25) / 2))
    assert seen == {"k": 4, "temperature": 1.5}


def _random(shape=(2, 6, 11), seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = (2 * torch.randn(*shape, generator=g)).requires_grad_(True)
    targets = torch.randint(0, shape[-1], shape[:2], generator=g)
    mask = (torch.rand(shape[:2], generator=g) > 0.3).float()
    return logits, targets, mask


def test_dft_gradient_is_that_of_minus_mean_p():
    logits, targets, mask = _random()
    out, exp = _batch(logits, targets, mask)
    loss, _ = build_objective(DFTConfig(type="dft"))(out, exp)
    (g_dft,) = torch.autograd.grad(aggregate(loss, exp.target_mask, "token_mean"), logits)
    p = torch.softmax(logits, -1).gather(-1, targets[..., None]).squeeze(-1)               # [B, L]
    (g_p,) = torch.autograd.grad(-(p * mask).sum() / mask.sum(), logits)
    torch.testing.assert_close(g_dft, g_p, atol=1e-7, rtol=1e-5)


def test_dft_equals_trl_sft_trainer_dft_loss(tiny_model_dir, tmp_path):
    """TRL 1.16 `SFTConfig(loss_type="dft")`: SFTTrainer.__init__ patches the model with `add_fused_lm_head` and
    `SFTTrainer.compute_loss` runs `model(**inputs, fused_lm_head=True)`, takes `-log_probs * log_probs.exp().detach()`
    per token and divides the sum by the number of label tokens. We build a real SFTTrainer and call its own
    compute_loss on its own collated batch; ours reads the same input_ids, with loss mask = (labels != -100), through
    posttrain.policy.forward -> DFT -> token_mean. Same model object, so same logits; losses and gradients must
    agree."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from posttrain.policy import forward

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    rows = [{"prompt": [{"role": "user", "content": f"What is {a} + {b}?"}],
             "completion": [{"role": "assistant", "content": f"{a}+{b}={a + b}\n#### {a + b}"}]}
            for a, b in [(12, 34), (5, 77), (60, 3), (9, 9)]]
    args = SFTConfig(output_dir=str(tmp_path / "trl"), loss_type="dft", report_to=[], per_device_train_batch_size=4,
                     use_cpu=True, bf16=False, max_length=64, completion_only_loss=True)
    trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tok)
    try:
        batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
        trl_loss = trainer.compute_loss(trainer.model, dict(batch))
        trl_grads = torch.autograd.grad(trl_loss, list(model.parameters()))
    finally:   # SFTTrainer sets up accelerate's process-wide state; leave none behind for the trainer tests
        from accelerate.state import AcceleratorState

        AcceleratorState._reset_state(reset_partial_state=True)

    labels = batch["labels"]
    exp = Experience(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                     loss_mask=(labels != -100).long(), source=torch.zeros_like(labels))
    per_token, _ = build_objective(DFTConfig(type="dft"))(forward(model, exp), exp)
    ours = aggregate(per_token, exp.target_mask, "token_mean")
    our_grads = torch.autograd.grad(ours, list(model.parameters()))
    assert exp.target_mask.sum() > 20
    torch.testing.assert_close(ours, trl_loss, atol=1e-6, rtol=1e-5)
    for a, b in zip(our_grads, trl_grads):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)


def test_asft_kl_zero_at_reference_and_brute_force_otherwise():
    logits, targets, mask = _random(seed=1)
    out, exp = _batch(logits, targets, mask)
    asft = build_objective(ASFTConfig(type="asft", kl_coef=0.3))
    exp.ref_logits = logits.detach() + 5.0                     # same distribution (softmax is shift invariant)
    loss, metrics = asft(out, exp)
    assert abs(float(metrics["kl"])) < 1e-6
    dft, _ = build_objective(DFTConfig(type="dft"))(out, exp)
    torch.testing.assert_close(loss, dft)

    ref = torch.randn(logits.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    exp.ref_logits = ref.float()
    loss, metrics = asft(out, exp)
    brute = torch.zeros(targets.shape, dtype=torch.float64)     # one position at a time, float64
    for i in range(targets.shape[0]):
        for t in range(targets.shape[1]):
            r, q = torch.softmax(ref[i, t], -1), torch.softmax(logits[i, t].detach().double(), -1)
            brute[i, t] = sum(float(r[v] * math.log(r[v] / q[v])) for v in range(r.numel()))
    torch.testing.assert_close((loss - dft).double() / 0.3, brute, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(metrics["kl"].double(), (brute * mask).sum() / mask.sum(), atol=1e-6, rtol=1e-5)
    # the gradient flows to pi only, and is lambda * (pi - pi_ref) + DFT's
    (g,) = torch.autograd.grad(aggregate(loss, exp.target_mask, "token_mean"), logits, retain_graph=True)
    p = torch.softmax(logits, -1)
    (g_dft,) = torch.autograd.grad(aggregate(dft, exp.target_mask, "token_mean"), logits)
    expect = g_dft + 0.3 * (p - torch.softmax(ref.float(), -1)).detach() * mask[..., None] / mask.sum()
    torch.testing.assert_close(g, expect, atol=1e-6, rtol=1e-5)


def _otr_expectation(logits, targets, mask, tau, beta):
    """-(1/N) sum_t [pi'(y_t) log pi(y_t) + beta sum_{a != y_t} pi'(a) log pi(a)], with sg(pi'), token_mean."""
    log_pi = torch.log_softmax(logits.double(), -1)                                # [B, L, V]
    pi_tau = torch.softmax(logits.detach().double() / tau, -1)                     # [B, L, V] pi'
    reward = torch.full_like(log_pi, beta).scatter(-1, targets[..., None], 1.0)    # R(a)
    per_token = -(pi_tau * reward * log_pi).sum(-1)                                # [B, L]
    return (per_token * mask).sum() / mask.sum()


@pytest.mark.parametrize("tau,beta", [(1.7, -0.3), (1.0, 0.0)])
def test_otr_monte_carlo_converges_to_its_expectation(tau, beta):
    logits, targets, mask = _random(shape=(2, 4, 6), seed=3)
    out, exp = _batch(logits, targets, mask)
    analytic = _otr_expectation(logits, targets, mask, tau, beta)
    (g_analytic,) = torch.autograd.grad(analytic, logits)
    errors = {}
    for k in (4, 2**16):
        torch.manual_seed(0)
        loss, _ = build_objective(OTRConfig(type="otr", num_samples=k, temperature=tau, beta=beta))(out, exp)
        mc = aggregate(loss, exp.target_mask, "token_mean")
        (g_mc,) = torch.autograd.grad(mc, logits, retain_graph=True)
        errors[k] = (abs(float(mc.detach()) - float(analytic.detach())), float((g_mc - g_analytic).abs().max()))
    assert errors[2**16][0] < 0.01 and errors[2**16][1] < 0.005, errors     # ~ 3 standard errors at K = 65536
    assert errors[2**16][0] < errors[4][0] + 1e-3, errors
    if tau == 1.0 and beta == 0.0:    # OTR is DFT in expectation (value and gradient), at scale 1 with the 1/K mean
        dft, _ = build_objective(DFTConfig(type="dft"))(out, exp)
        dft_mean = aggregate(dft, exp.target_mask, "token_mean")
        torch.testing.assert_close(analytic.float(), dft_mean, atol=1e-6, rtol=1e-5)
        (g_dft,) = torch.autograd.grad(dft_mean, logits)
        torch.testing.assert_close(g_analytic.float(), g_dft, atol=1e-6, rtol=1e-5)


def test_configs_validate():
    from posttrain.configlib import ConfigError, build

    with pytest.raises(ConfigError, match="beta"):
        build(OTRConfig, {"type": "otr", "beta": 1.0}, "objectives.otr")
    with pytest.raises(ConfigError, match="kl_coef"):
        build(ASFTConfig, {"type": "asft", "kl_coef": -1}, "objectives.asft")
    with pytest.raises(ConfigError, match="kl_direction"):
        build(ASFTConfig, {"type": "asft", "kl_direction": "sideways"}, "objectives.asft")


@pytest.mark.slow
@pytest.mark.parametrize("method", ["dft", "asft", "otr"])
def test_tiny_recipe_trains(method, tiny_model_dir, tmp_path):
    """recipes/tiny/<method>.yaml end to end: a short SFT warm-up, then the method. What must improve is what the
    objective descends: DFT/ASFT descend -mean(p) (their loss -p log p itself *rises* while p < 1/e, as it is here
    after a short warm-up), OTR raises the probability of drawing the gold token; all three must make the
    demonstrations more likely (nll falls). ASFT's KL to the stage-start reference starts at 0 and grows."""
    from posttrain.config import load_recipe
    from posttrain.trainer import train

    from conftest import read_metrics

    recipe = load_recipe(REPO / "recipes" / "tiny" / f"{method}.yaml", [
        f"model.path={tiny_model_dir}", f"output_dir={tmp_path / method}", "logging.report_to=[]",
        "logging.progress_bar=false", "eval.data=null", "data.task.num_examples=256", "train.batch_size=16",
        "train.micro_batch_size=16", "train.log_every=1", "stages.0.train.steps=10", "stages.1.train.steps=10"])
    train(recipe)
    rows = [r for r in read_metrics(tmp_path / method) if r.get("stage") == 1 and "loss" in r]
    assert len(rows) == 10 and all(math.isfinite(r["loss"]) for r in rows)
    first, last = rows[:3], rows[-3:]

    def mean(rs, k):
        return sum(r[k] for r in rs) / len(rs)

    print(method, [(round(r[f"{method}/nll"], 3), round(r["loss"], 4)) for r in rows])
    assert mean(last, f"{method}/nll") < mean(first, f"{method}/nll") - 0.02
    if method == "asft":
        assert rows[0]["asft/kl"] < 1e-4 < rows[-1]["asft/kl"]
    else:
        progress = {"dft": "dft/p", "otr": "otr/hit_rate"}[method]
        assert mean(last, progress) > mean(first, progress)
