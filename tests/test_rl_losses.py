"""RL losses: hand-computed per-token values of every preset, invariances of their aggregation, equality with TRL's
GRPOTrainer._compute_loss, KL estimators, truncated importance sampling, and the value head."""
import math
from collections import defaultdict
from contextlib import nullcontext
from types import SimpleNamespace

import pytest
import torch

from posttrain.configlib import ConfigError, build
from posttrain.experience import POLICY, PROMPT, Experience
from posttrain.objectives import Normalizer, aggregate, build_objective
from posttrain.objectives.grpo import DAPOConfig, DrGRPOConfig, GRPOConfig
from posttrain.objectives.ppo import PPOConfig
from posttrain.ops.logprobs import selective_log_softmax, token_entropy
from posttrain.policy import PolicyOutput, forward
from posttrain.rl.kl import kl_estimate, kl_reward_penalty
from posttrain.rl.surrogate import clipped_surrogate, truncated_is_weight

LN2 = math.log(2)


# ------------------------------------------------------------------------------------------- KL estimators
def test_kl_estimators_by_hand():
    # pi = 0.5, pi_ref = 0.25: z = ln(0.25 / 0.5) = -ln 2 = -0.693147
    # k1 = -z = 0.693147; k2 = z^2 / 2 = 0.240227; k3 = e^z - z - 1 = 0.5 + 0.693147 - 1 = 0.193147
    # pi = 0.3, pi_ref = 0.6: z = +ln 2: k1 = -0.693147, k2 = 0.240227, k3 = 2 - 0.693147 - 1 = 0.306853
    logp, ref = torch.log(torch.tensor([0.5, 0.3])), torch.log(torch.tensor([0.25, 0.6]))
    assert kl_estimate(logp, ref, "k1").tolist() == pytest.approx([LN2, -LN2], abs=1e-6)
    assert kl_estimate(logp, ref, "k2").tolist() == pytest.approx([LN2 ** 2 / 2] * 2, abs=1e-6)
    assert kl_estimate(logp, ref, "k3").tolist() == pytest.approx([0.193147, 0.306853], abs=1e-6)
    # z is clamped to [-20, 20]: z = 30 -> k1 = -20, k3 = e^20 - 21 = 485165174.41; z = -50 -> k3 = e^-20 + 19
    z = torch.tensor([30.0, -50.0])
    assert kl_estimate(torch.zeros(2), z, "k1").tolist() == [-20.0, 20.0]
    assert kl_estimate(torch.zeros(2, dtype=torch.float64), z.double(), "k3").tolist() == pytest.approx(
        [math.exp(20) - 21, math.exp(-20) + 19], rel=1e-9)
    # in the reward (experience builder): -beta * k1(old, ref), no gradient; beta 0.1 -> [-0.0693147, +0.0693147]
    old = logp.clone().requires_grad_()
    pen = kl_reward_penalty(old, ref, 0.1)
    assert pen.tolist() == pytest.approx([-0.1 * LN2, 0.1 * LN2], abs=1e-6) and not pen.requires_grad
    # expected gradients (exact expectation over a 3-token vocabulary, samples from pi):
    # E[grad k3] = grad KL(ref || pi), E[grad k2] = grad KL(pi || ref), E[grad k1] = 0
    theta = torch.tensor([0.3, -0.2, 0.5], dtype=torch.float64, requires_grad=True)
    ref_p = torch.tensor([0.2, 0.5, 0.3], dtype=torch.float64)

    def expected_grad(k):
        logp_all = torch.log_softmax(theta, -1)
        e = (logp_all.exp().detach() * kl_estimate(logp_all, ref_p.log(), k)).sum()
        return torch.autograd.grad(e, theta)[0]

    def grad_of(f):
        return torch.autograd.grad(f(torch.log_softmax(theta, -1)), theta)[0]

    assert torch.allclose(expected_grad("k3"), grad_of(lambda lp: (ref_p * (ref_p.log() - lp)).sum()))
    assert torch.allclose(expected_grad("k2"), grad_of(lambda lp: (lp.exp() * (lp - ref_p.log())).sum()))
    assert torch.allclose(expected_grad("k1"), torch.zeros(3, dtype=torch.float64), atol=1e-12)


def test_entropy_metric():
    # uniform logits over V = 4: H = ln 4 = 1.386294; random logits: -sum p log p
    assert token_entropy(torch.zeros(2, 3, 4)).flatten().tolist() == pytest.approx([math.log(4)] * 6, abs=1e-6)
    logits = torch.randn(2, 5, 11)
    p = logits.softmax(-1)
    assert torch.allclose(token_entropy(logits), -(p * p.log()).sum(-1), atol=1e-5)


# --------------------------------------------------------------------------------------- clipped surrogate
def test_clipped_surrogate_by_hand():
    # eps_low 0.2, eps_high 0.28 (DAPO): clip range [0.8, 1.28]
    # t0: r 1.5,  A +1: -min(1.5, 1.28)  = -1.28  upper clip active (grad 0)
    # t1: r 0.5,  A +1: -min(0.5, 0.8)   = -0.5   unclipped (grad -A = -1)
    # t2: r 0.5,  A -1: -min(-0.5, -0.8) =  0.8   lower clip active (grad 0)
    # t3: r 1.5,  A -1: -min(-1.5, -1.28)=  1.5   unclipped (grad +1); dual clip c = 1.4: min(1.5, 1.4 * 1) = 1.4
    # t4: r 1.1,  A +2: -min(2.2, 2.2)   = -2.2   unclipped (grad -2)
    ratio = torch.tensor([1.5, 0.5, 0.5, 1.5, 1.1], requires_grad=True)
    adv = torch.tensor([1.0, 1.0, -1.0, -1.0, 2.0])
    s = clipped_surrogate(ratio, adv, 0.2, 0.28)
    assert s.loss.tolist() == pytest.approx([-1.28, -0.5, 0.8, 1.5, -2.2], abs=1e-6)
    assert s.clipped_high.tolist() == [True, False, False, False, False]
    assert s.clipped_low.tolist() == [False, False, True, False, False]
    assert torch.autograd.grad(s.loss.sum(), ratio)[0].tolist() == pytest.approx([0, -1, 0, 1, -2], abs=1e-6)
    d = clipped_surrogate(ratio, adv, 0.2, 0.28, dual_clip=1.4)
    assert d.loss.tolist() == pytest.approx([-1.28, -0.5, 0.8, 1.4, -2.2], abs=1e-6)
    assert d.clipped_dual.tolist() == [False, False, False, True, False]
    assert torch.autograd.grad(d.loss.sum(), ratio)[0].tolist() == pytest.approx([0, -1, 0, 0, -2], abs=1e-6)


def test_truncated_importance_weight_by_hand():
    # w = min(pi_old / pi_sampler, 2): 0.5/0.5 = 1; 0.6/0.2 = 3 -> 2; 0.3/0.6 = 0.5; a NaN sampler log-prob -> 1
    old = torch.log(torch.tensor([0.5, 0.6, 0.3, 0.3]))
    sampler = torch.log(torch.tensor([0.5, 0.2, 0.6, float("nan")]))
    assert truncated_is_weight(old, sampler, 2.0).tolist() == pytest.approx([1.0, 2.0, 0.5, 1.0], abs=1e-6)
    assert truncated_is_weight(torch.zeros(1), torch.tensor([-1e4]), 3.0).item() == pytest.approx(3.0)   # no inf


# ------------------------------------------------------------------------------------ the presets by hand
def tiny_rollout(adv=(1.0, -0.5)) -> tuple[PolicyOutput, Experience, torch.Tensor]:
    """Two rows of 4 tokens [prompt, o1, o2, pad|o2]; predicted positions L = 3; loss tokens: row 0 positions 1, 2;
    row 1 position 1. Log-probs are given directly (a leaf to differentiate), logits are uniform over V = 4."""
    logp = torch.log(torch.tensor([[0.9, 0.5, 0.4], [0.9, 0.3, 0.9]])).requires_grad_()     # log pi
    exp = Experience(
        input_ids=torch.zeros(2, 4, dtype=torch.long), attention_mask=torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]]),
        loss_mask=torch.tensor([[0, 0, 1, 1], [0, 0, 1, 0]]),
        source=torch.tensor([[PROMPT, PROMPT, POLICY, POLICY]] * 2),
        old_logprobs=torch.log(torch.tensor([[0.9, 0.4, 0.5], [0.9, 0.3, 0.9]])),              # log pi_old
        ref_logprobs=torch.log(torch.tensor([[0.9, 0.25, 0.4], [0.9, 0.6, 0.9]])),             # log pi_ref
        advantages=torch.tensor(adv)[:, None].expand(2, 3).clone())
    logits = torch.zeros(2, 3, 4)
    return PolicyOutput(logits=logits, logprobs=logp, entropy=token_entropy(logits)), exp, logp


# r = pi / pi_old on the loss tokens: row 0: 0.5/0.4 = 1.25, 0.4/0.5 = 0.8; row 1: 0.3/0.3 = 1.
# k3 on them: row 0: z = ln(0.25/0.5) = -ln 2 -> 0.193147, z = 0 -> 0; row 1: z = ln(0.6/0.3) = ln 2 -> 0.306853.
# A = +1 on row 0, -0.5 on row 1.
def test_grpo_preset_by_hand():
    out, exp, logp = tiny_rollout()
    grpo = build_objective(build(GRPOConfig, {"type": "grpo"}))          # eps 0.2, beta 0.04, k3, seq_mean_token_mean
    assert grpo.source == "rollouts" and grpo.needs == {"reference", "entropy"}
    loss, m = grpo(out, exp)
    # row 0 t1: -min(1.25, 1.2) + 0.04 * 0.193147 = -1.2 + 0.0077259 = -1.1922741   (upper clip)
    # row 0 t2: -min(0.8, 0.8) + 0 = -0.8;   row 1 t1: -min(-0.5, -0.5) + 0.04 * 0.306853 = 0.5122741
    mask = exp.target_mask
    assert loss[0, 1:].tolist() == pytest.approx([-1.1922741, -0.8], abs=1e-5)
    assert loss[1, 1].item() == pytest.approx(0.5122741, abs=1e-5)
    # seq_mean_token_mean: ((-1.1922741 - 0.8) / 2 + 0.5122741) / 2 = -0.2419315
    total = aggregate(loss, mask, grpo.config.aggregation)
    assert total.item() == pytest.approx(-0.2419315, abs=1e-5)
    # metrics, token means over 3 tokens: one upper clip; k3 mean = (0.193147 + 0 + 0.306853) / 3 = 1/6; H = ln 4
    assert float(m["clip_ratio/high"]) == pytest.approx(1 / 3) and float(m["clip_ratio/low"]) == 0
    assert float(m["kl"]) == pytest.approx(1 / 6, abs=1e-6)
    assert float(m["entropy"]) == pytest.approx(math.log(4), abs=1e-5)
    # gradient w.r.t. log pi, weights 1/4 (row 0 tokens), 1/2 (row 1):
    # row 0 t1: clipped -> 0, plus k3' = 0.04 (1 - e^z) = 0.04 * 0.5 = 0.02 -> 0.005
    # row 0 t2: -r A = -0.8 -> -0.2;  row 1 t1: -r A + 0.04 (1 - 2) = 0.5 - 0.04 = 0.46 -> 0.23
    g = torch.autograd.grad(total, logp)[0]
    assert g.tolist() == [[0.0, pytest.approx(0.005, abs=1e-6), pytest.approx(-0.2, abs=1e-6)],
                          [0.0, pytest.approx(0.23, abs=1e-6), 0.0]]
    # KL in the reward instead: no KL term in the loss (row 0 t1 = -1.2), still logged
    in_reward = build_objective(build(GRPOConfig, {"type": "grpo", "kl_placement": "reward"}))
    assert in_reward(out, exp)[0][0, 1].item() == pytest.approx(-1.2, abs=1e-6)
    # one update per rollout batch (no old log-probs): r == 1 and the gradient is -A (+ KL)
    on_policy = build_objective(build(GRPOConfig, {"type": "grpo", "beta": 0.0}))
    exp.old_logprobs = None
    loss, m = on_policy(out, exp)
    assert float(m["ratio/mean"]) == 1.0 and loss[0, 1].item() == pytest.approx(-1.0)
    exp.ref_logprobs = None
    with pytest.raises(ValueError, match="ref_logprobs"):
        grpo(out, exp)


def test_dapo_and_dr_grpo_presets_by_hand():
    out, exp, logp = tiny_rollout()
    dapo = build_objective(build(DAPOConfig, {"type": "dapo"}))     # eps 0.2 / 0.28, beta 0, token_mean
    assert dapo.source == "rollouts" and dapo.needs == {"entropy"} and dapo.config.dynamic_sampling
    loss, m = dapo(out, exp)
    # row 0: -min(1.25, 1.25) = -1.25 (inside [0.8, 1.28]); -0.8; row 1: 0.5 -> token_mean = -1.55 / 3 = -0.5166667
    assert loss[0, 1:].tolist() == pytest.approx([-1.25, -0.8], abs=1e-5) and loss[1, 1].item() == pytest.approx(0.5)
    assert aggregate(loss, exp.target_mask, "token_mean").item() == pytest.approx(-0.5166667, abs=1e-6)
    assert float(m["clip_ratio/high"]) == 0
    dr = build_objective(build(DrGRPOConfig, {"type": "dr_grpo"}))  # eps 0.2, beta 0, seq_mean_token_sum_norm
    assert dr.config.advantage == "group_mean"
    loss, m = dr(out, exp)
    assert float(m["clip_ratio/high"]) == pytest.approx(1 / 3)         # r = 1.25 > 1.2 with A > 0
    # -1.2, -0.8, 0.5 -> sum -1.5 / (B = 2 * L_max = 4) = -0.1875
    norm = Normalizer.of(exp.target_mask, max_len=4)
    assert aggregate(loss, exp.target_mask, dr.config.aggregation, norm).item() == pytest.approx(-0.1875, abs=1e-6)


def test_truncated_is_in_the_grpo_loss():
    out, exp, _ = tiny_rollout()
    # pi_old on the loss tokens: row 0 [0.4, 0.5], row 1 [0.3]; the sampler's: row 0 [0.2, 0.8], row 1 [0.1]
    # w = min(pi_old / pi_sampler, 2): row 0 [min(2, 2), min(0.625, 2)] = [2, 0.625]; row 1 min(3, 2) = 2
    exp.sampler_logprobs = torch.log(torch.tensor([[0.9, 0.2, 0.8], [0.9, 0.1, 0.9]]))
    obj = build_objective(build(DAPOConfig, {"type": "dapo", "is_cap": 2.0}))
    loss, m = obj(out, exp)
    # w * pg: 2 * -1.25 = -2.5; 0.625 * -0.8 = -0.5; 2 * 0.5 = 1.0
    assert loss[0, 1:].tolist() == pytest.approx([-2.5, -0.5], abs=1e-5) and loss[1, 1].item() == pytest.approx(1.0)
    assert [float(m[f"is_weight/{k}"]) for k in ("min", "mean", "max")] == pytest.approx([0.625, 4.625 / 3, 2.0])


def test_ppo_by_hand():
    out, exp, logp = tiny_rollout()
    out.values = torch.tensor([[9.0, 0.5, 0.9], [9.0, 0.0, 9.0]], requires_grad=True)   # V (current head)
    exp.values = torch.tensor([[0.0, 0.4, 0.5], [0.0, 0.1, 0.0]])                      # V_old
    exp.returns = torch.tensor([[0.0, 1.0, 1.2], [0.0, -0.2, 0.0]])                    # R
    ppo = build_objective(build(PPOConfig, {"type": "ppo"}))     # eps 0.2, value clip 0.2, vf_coef 5, token_mean
    assert ppo.source == "rollouts" and ppo.needs == {"values", "reference", "entropy"}
    loss, m = ppo(out, exp)
    # value loss 0.5 max((V - R)^2, (clip(V, V_old -+ 0.2) - R)^2):
    # row 0 t1: V 0.5, clip to [0.2, 0.6] = 0.5: 0.5 * 0.25 = 0.125
    # row 0 t2: V 0.9, clip to [0.3, 0.7] = 0.7: max(0.09, 0.25) -> 0.125 (the clipped term wins: gradient 0)
    # row 1 t1: V 0.0, clip to [-0.1, 0.3] = 0.0: 0.5 * 0.04 = 0.02
    # policy as GRPO without KL (KL is in the reward for PPO): -1.2, -0.8, 0.5
    # total: -1.2 + 5 * 0.125 = -0.575; -0.8 + 0.625 = -0.175; 0.5 + 0.1 = 0.6
    assert loss[0, 1:].tolist() == pytest.approx([-0.575, -0.175], abs=1e-5) and loss[1, 1].item() == pytest.approx(0.6)
    assert float(m["vf_clip_frac"]) == pytest.approx(1 / 3) and float(m["vf_loss"]) == pytest.approx(0.27 / 3)
    total = aggregate(loss, exp.target_mask, "token_mean")
    # dL/dV = vf_coef * (V - R) / N on unclipped tokens: 5 * (-0.5) / 3, 0 (clipped), 5 * 0.2 / 3
    g = torch.autograd.grad(total, out.values)[0]
    assert g.tolist() == [[0.0, pytest.approx(-2.5 / 3), 0.0], [0.0, pytest.approx(1 / 3), 0.0]]
    out.values = None
    with pytest.raises(ValueError, match="ValueHeadModel"):
        ppo(out, exp)


def test_config_errors_name_the_key():
    with pytest.raises(ConfigError, match="objectives.g.kl_estimator: k1 has zero expected gradient"):
        build(GRPOConfig, {"type": "grpo", "kl_estimator": "k1"}, "objectives.g")
    with pytest.raises(ConfigError, match="objectives.g.advantage: got 'nope'"):
        build(GRPOConfig, {"type": "grpo", "advantage": "nope"}, "objectives.g")
    with pytest.raises(ConfigError, match="objectives.p.dual_clip: must be > 1"):
        build(PPOConfig, {"type": "ppo", "dual_clip": 0.5}, "objectives.p")
    # k1 is fine in the reward
    assert build(GRPOConfig, {"type": "grpo", "kl_estimator": "k1", "kl_placement": "reward"}).beta == 0.04


# ------------------------------------------------------------------------------ aggregation invariances
def ragged_rollout(seed=0, b=5, p=3, c=6, v=7):
    """Random logits [B, T, V] (a leaf), prompts of p tokens, completions of ragged lengths, old/ref log-probs."""
    g = torch.Generator().manual_seed(seed)
    t = p + c
    logits = torch.randn(b, t, v, generator=g).requires_grad_()
    ids = torch.randint(0, v, (b, t), generator=g)
    lens = torch.tensor([6, 1, 4, 3, 5][:b])
    comp = (torch.arange(c)[None] < lens[:, None]).long()                  # [B, C] completion mask
    loss_mask = torch.cat([torch.zeros(b, p, dtype=torch.long), comp], 1)
    with torch.no_grad():
        logp = selective_log_softmax(logits[:, :-1], ids[:, 1:])
    exp = Experience(input_ids=ids, attention_mask=torch.cat([torch.ones(b, p, dtype=torch.long), comp], 1),
                     loss_mask=loss_mask, source=torch.where(loss_mask > 0, POLICY, PROMPT),
                     old_logprobs=logp + 0.4 * torch.randn(logp.shape, generator=g),
                     ref_logprobs=logp + 0.3 * torch.randn(logp.shape, generator=g),
                     advantages=torch.randn(b, generator=g)[:, None].expand(b, t - 1).clone(),
                     columns=[{} for _ in range(b)])
    return logits, exp


def policy_out(logits, exp):
    lg = logits[:, :-1]
    return PolicyOutput(logits=lg, logprobs=selective_log_softmax(lg, exp.targets), entropy=token_entropy(lg))


def test_aggregations_equal_python_loops_and_accumulation():
    logits, exp = ragged_rollout()
    obj = build_objective(build(GRPOConfig, {"type": "grpo"}))
    per_token, _ = obj(policy_out(logits, exp), exp)
    mask = exp.target_mask
    rows = [[per_token[i, t].item() for t in range(mask.shape[1]) if mask[i, t]] for i in range(len(exp))]
    flat = [x for r in rows for x in r]
    norm = Normalizer.of(mask, max_len=6)
    assert aggregate(per_token, mask, "token_mean", norm).item() == pytest.approx(sum(flat) / len(flat), rel=1e-5)
    assert aggregate(per_token, mask, "seq_mean_token_mean", norm).item() == pytest.approx(
        sum(sum(r) / len(r) for r in rows) / len(rows), rel=1e-5)
    assert aggregate(per_token, mask, "seq_mean_token_sum_norm", norm).item() == pytest.approx(
        sum(flat) / (len(rows) * 6), rel=1e-5)
    # gradient accumulation: micro-batches of 2 + 2 + 1 rows with the step's global normalizer give the same loss
    # and the same gradient as the whole batch, for every aggregation
    for mode in ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm"):
        whole = aggregate(obj(policy_out(logits, exp), exp)[0], mask, mode, norm)
        g_whole = torch.autograd.grad(whole, logits)[0]
        acc, g_acc = 0.0, torch.zeros_like(logits)
        for rows_ in (slice(0, 2), slice(2, 4), slice(4, 5)):
            mb = exp.select(rows_)
            lg = logits.detach()[rows_].requires_grad_()
            part = aggregate(obj(policy_out(lg, mb), mb)[0], mb.target_mask, mode, norm)
            g_acc[rows_] += torch.autograd.grad(part, lg)[0]
            acc += part.item()
        assert acc == pytest.approx(whole.item(), rel=1e-5), mode
        assert torch.allclose(g_acc, g_whole, atol=1e-7), mode


# ------------------------------------------------------------------------------- TRL's GRPOTrainer loss
# How the correspondence is made. TRL's `_compute_loss(model, inputs)` reads prompt/completion ids and masks, the
# advantages [B], old and reference log-probs over the completion [B, C], and the trainer attributes set below; the
# stub model returns the log-probs of our logits the way TRL's fused LM head does ([B, T-1], zero on ignored
# labels). Our side uses the same logits through posttrain.ops.logprobs and an Experience whose loss mask is the
# completion mask (our [B, L] predicted positions P-1 .. T-2 are TRL's completion positions). Then, with
# use_bias_correction_kl=False (TRL 1.16 defaults it to True: k3 times the ratio) and loss_type set explicitly:
#   grpo    = our seq_mean_token_mean  (per micro-batch; TRL divides by the accumulation steps)
#   bnpo    = our token_mean with the micro-batch's own normalizer (TRL: local token mean / accumulation steps)
#   dr_grpo = our seq_mean_token_sum_norm with Normalizer(seqs = B, max_len = max_completion_length)
#   dapo    = our token_mean with the step's global normalizer: TRL divides every micro-batch's token sum by
#             num_items_in_batch (tokens of the whole generation batch) / processes * accumulation
#             / steps_per_generation
class FakeAccelerator:
    num_processes, is_main_process = 1, True

    def autocast(self):
        return nullcontext()

    def reduce(self, tensor, reduction="sum"):
        return tensor

    def gather(self, tensor):
        return tensor


class StubLM(torch.nn.Module):
    """Returns log softmax(logits)[next token] as TRL's fused LM head does: [B, T-1], 0 where the label is -100."""

    def __init__(self, logits):
        super().__init__()
        self.logits = logits

    def forward(self, input_ids, attention_mask, labels, fused_lm_head, **kwargs):
        assert fused_lm_head and input_ids.shape == self.logits.shape[:2]
        lp = torch.log_softmax(self.logits[:, :-1].float(), -1).gather(-1, input_ids[:, 1:, None]).squeeze(-1)
        lp = lp.masked_fill(labels[:, 1:] == -100, 0.0)
        return SimpleNamespace(log_probs=lp, entropy=torch.zeros_like(lp))


def trl_trainer(loss_type, beta, eps_low, eps_high, max_completion_length, grad_accum, steps_per_generation):
    from trl.trainer.grpo_trainer import GRPOTrainer

    t = object.__new__(GRPOTrainer)
    t.args = SimpleNamespace(use_bias_correction_kl=False, delta=None, steps_per_generation=steps_per_generation,
                             report_to=[])
    t.loss_type, t.beta, t.epsilon_low, t.epsilon_high = loss_type, beta, eps_low, eps_high
    t.max_completion_length, t.current_gradient_accumulation_steps = max_completion_length, grad_accum
    t.top_entropy_quantile, t.off_policy_mask_threshold, t.importance_sampling_level = 1.0, None, "token"
    t.use_vllm, t.vllm_importance_sampling_correction = False, False
    t.aux_loss_enabled, t._entropy_bonus_enabled = False, False
    t.accelerator, t.state = FakeAccelerator(), SimpleNamespace(global_step=0)
    t._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
    return t


def trl_loss(trainer, logits, exp, p, rows, num_items=None):
    """TRL's loss on rows `rows` of our rollout (same logits, same old/ref log-probs, same advantages)."""
    trainer.model = StubLM(logits[rows])
    ids, mask = exp.input_ids[rows], exp.loss_mask[rows]
    inputs = {"prompt_ids": ids[:, :p], "prompt_mask": exp.attention_mask[rows, :p],
              "completion_ids": ids[:, p:], "completion_mask": mask[:, p:],
              "advantages": exp.advantages[rows, 0],
              "old_per_token_logps": exp.old_logprobs[rows, p - 1 :],
              "ref_per_token_logps": exp.ref_logprobs[rows, p - 1 :]}
    if num_items is not None:
        inputs["num_items_in_batch"] = torch.tensor(float(num_items))
    return trainer._compute_loss(trainer.model, inputs)


@pytest.mark.parametrize("loss_type,preset,overrides,mode", [
    ("grpo", "grpo", {}, "seq_mean_token_mean"),
    ("bnpo", "grpo", {"aggregation": "token_mean"}, "token_mean"),
    ("dr_grpo", "dr_grpo", {"beta": 0.04}, "seq_mean_token_sum_norm"),
    ("dapo", "dapo", {}, "token_mean"),
    ("dapo", "dapo", {"beta": 0.1, "eps_low": 0.1}, "token_mean"),
])
def test_losses_equal_trl(loss_type, preset, overrides, mode):
    cfg_cls = {"grpo": GRPOConfig, "dr_grpo": DrGRPOConfig, "dapo": DAPOConfig}[preset]
    cfg = build(cfg_cls, {"type": preset, **overrides})
    assert cfg.aggregation == mode
    obj = build_objective(cfg)
    p, c = 3, 6
    logits, exp = ragged_rollout(seed=1, p=p, c=c)
    mask = exp.target_mask
    if loss_type == "dapo":     # global token mean over two micro-batches (rows 0-1 and 2-4) of one generation batch
        splits, accum = (slice(0, 2), slice(2, 5)), 2
        norm = Normalizer.of(mask)
    else:                       # one micro-batch
        splits, accum = (slice(0, 5),), 1
        norm = Normalizer(tokens=float(mask.sum()), seqs=5.0, max_len=float(c))
    trainer = trl_trainer(loss_type, cfg.beta, cfg.eps_low, cfg.eps_high, c, accum, accum)
    ours_total, trl_total = 0.0, 0.0
    g_ours, g_trl = torch.zeros_like(logits), torch.zeros_like(logits)
    for rows in splits:
        mb = exp.select(rows)
        lg = logits.detach()[rows].requires_grad_()
        mb_norm = Normalizer.of(mb.target_mask) if loss_type == "bnpo" else norm
        ours = aggregate(obj(policy_out(lg, mb), mb)[0], mb.target_mask, mode, mb_norm)
        g_ours[rows] += torch.autograd.grad(ours, lg)[0]
        lt = logits.detach().clone().requires_grad_()
        theirs = trl_loss(trainer, lt, exp, p, rows, num_items=mask.sum().item())
        g_trl += torch.autograd.grad(theirs, lt)[0]
        ours_total, trl_total = ours_total + ours.item(), trl_total + theirs.item()
    assert ours_total == pytest.approx(trl_total, abs=1e-6)
    assert torch.allclose(g_ours, g_trl, atol=1e-7)
    if loss_type == "dapo":     # and both are the token mean of the whole batch
        whole = aggregate(obj(policy_out(logits, exp), exp)[0], mask, "token_mean")
        assert ours_total == pytest.approx(whole.item(), abs=1e-6)
    else:                       # metrics of one micro-batch: clip fractions and KL as token means
        _, m = obj(policy_out(logits, exp), exp)
        trl_m = trainer._metrics["train"]
        assert float(m["clip_ratio/low"]) == pytest.approx(trl_m["clip_ratio/low_mean"][-1], abs=1e-6)
        assert float(m["clip_ratio/high"]) == pytest.approx(trl_m["clip_ratio/high_mean"][-1], abs=1e-6)
        assert float(m["clip_ratio/low"]) + float(m["clip_ratio/high"]) > 0   # the inputs exercise the clip
        if cfg.beta > 0:
            assert float(m["kl"]) == pytest.approx(trl_m["kl"][-1], abs=1e-6)


# ------------------------------------------------------------------------------------------- value head
@pytest.fixture(scope="module")
def tiny_lm():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=1, max_position_embeddings=64, tie_word_embeddings=True)
    return Qwen2ForCausalLM(cfg).eval()


def test_value_head_forward_and_checkpoint_round_trip(tiny_lm, tmp_path):
    from posttrain.rl.value_head import VALUE_HEAD_FILE, ValueHeadModel

    model = ValueHeadModel(tiny_lm).eval()
    torch.nn.init.normal_(model.value_head.weight)
    ids = torch.randint(0, 32, (2, 7))
    att = torch.tensor([[1] * 7, [1] * 5 + [0] * 2])
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=att)
        ref = tiny_lm(input_ids=ids, attention_mask=att, output_hidden_states=True)
    # one forward: the logits are the LM's, and V = w . h + b on the final normed hidden state
    assert torch.allclose(out.logits, ref.logits)
    assert torch.allclose(out.values, model.value_head(ref.hidden_states[-1]).squeeze(-1), atol=1e-6)
    # policy.forward gives values over predicted positions [B, L], aligned with the log-probs (the LM head
    # projects positions 0..T-2 only: same numbers up to the matmul's blocking)
    exp = Experience(input_ids=ids, attention_mask=att, loss_mask=att, source=att)
    with torch.no_grad():
        pout, full = forward(model, exp), forward(model, exp, logits=True)
    assert pout.values.shape == pout.logprobs.shape == (2, 6)
    assert torch.allclose(pout.values, out.values[:, :-1], atol=1e-6)
    assert torch.allclose(full.values, pout.values) and torch.allclose(full.logprobs, pout.logprobs, atol=1e-6)
    assert pout.logits is None and torch.allclose(full.logits, out.logits[:, :-1], atol=1e-6)   # positions 0..T-2
    # state_dict keys (what accelerate's save_state writes) round trip into a fresh wrapper
    state = model.state_dict()
    assert {"value_head.weight", "value_head.bias"} <= set(state) and any(k.startswith("model.") for k in state)
    from transformers import Qwen2ForCausalLM

    fresh = ValueHeadModel(Qwen2ForCausalLM(tiny_lm.config)).eval()
    fresh.load_state_dict(state)
    with torch.no_grad():
        assert torch.equal(fresh(input_ids=ids, attention_mask=att).values, out.values)
    # save_pretrained: the backbone as transformers saves it plus value_head.safetensors; from_pretrained reads both
    model.save_pretrained(tmp_path / "ckpt", state_dict=state)
    assert (tmp_path / "ckpt" / VALUE_HEAD_FILE).is_file() and (tmp_path / "ckpt" / "config.json").is_file()
    loaded = ValueHeadModel.from_pretrained(tmp_path / "ckpt").eval()
    with torch.no_grad():
        again = loaded(input_ids=ids, attention_mask=att)
    assert torch.allclose(again.logits, out.logits, atol=1e-6) and torch.allclose(again.values, out.values, atol=1e-6)
    # a plain policy checkpoint (after SFT warm-up) loads with a fresh head
    tiny_lm.save_pretrained(tmp_path / "plain")
    plain = ValueHeadModel.from_pretrained(tmp_path / "plain")
    assert plain.value_head.weight.abs().max() < 1.0 and not (tmp_path / "plain" / VALUE_HEAD_FILE).exists()


def test_ppo_gradient_reaches_the_value_head(tiny_lm):
    from posttrain.rl.value_head import ValueHeadModel

    model = ValueHeadModel(tiny_lm)
    ids = torch.randint(0, 32, (2, 6))
    att = torch.ones(2, 6, dtype=torch.long)
    loss_mask = torch.tensor([[0, 0, 1, 1, 1, 1], [0, 0, 0, 1, 1, 0]])
    with torch.no_grad():
        v_old = forward(model, Experience(input_ids=ids, attention_mask=att, loss_mask=loss_mask, source=att)).values
    returns = torch.randn(2, 5)
    exp = Experience(input_ids=ids, attention_mask=att, loss_mask=loss_mask, source=att, advantages=torch.zeros(2, 5),
                     values=v_old, returns=returns)
    ppo = build_objective(build(PPOConfig, {"type": "ppo", "beta": 0.0, "value_clip": 1e6, "entropy_metric": False}))
    out = forward(model, exp)
    total = aggregate(ppo(out, exp)[0], exp.target_mask, "token_mean")
    total.backward()
    # A = 0, so only the value loss: dL/db = vf_coef * sum_t m_t (V_t - R_t) / N
    m = exp.target_mask
    expected = 5.0 * ((v_old - returns) * m).sum() / m.sum()
    assert model.value_head.bias.grad.item() == pytest.approx(expected.item(), rel=1e-4)
    assert model.model.model.layers[0].mlp.up_proj.weight.grad.abs().sum() > 0   # the shared backbone learns too
