"""Advantage estimators, GAE, whitening over processes and DAPO dynamic sampling (posttrain/rl/)."""
import math
import threading

import pytest
import torch

from posttrain.experience import POLICY, PROMPT, Experience
from posttrain.rl.advantages import (
    ADVANTAGES,
    AdvantageInputs,
    AdvantageParams,
    compute_advantages,
    discounted_reverse_cumsum,
    gae,
    group_mean_advantage,
    group_zscore_advantage,
    rloo_advantage,
    token_rewards,
    whiten,
)
from posttrain.rl.sampling import fill_batch, informative

# Eight samples in three groups, interleaved and with non-contiguous ids: group 7 = rows 0, 2, 3, 7;
# group 3 = rows 1, 4, 6; group 9 = row 5 alone.
REWARDS = torch.tensor([1.0, 1.0, 0.0, 0.0, 0.0, 5.0, 1.0, 1.0])
GROUPS = torch.tensor([7, 3, 7, 7, 3, 9, 3, 7])
S3 = 1 / math.sqrt(3)   # 0.577350


def test_group_estimators_by_hand():
    # group 7: R = [1, 0, 0, 1], mean 0.5, deviations +-0.5; unbiased var = 4 * 0.25 / 3 = 1/3, std = 0.577350
    #          -> z = +-0.5 / 0.577350 = +-0.866025; biased std = 0.5 -> z = +-1
    # group 3: R = [1, 0, 1], mean 2/3, deviations [1/3, -2/3, 1/3]; unbiased var = (1/9 + 4/9 + 1/9) / 2 = 1/3
    #          -> z = [0.577350, -1.154701, 0.577350];
    #          biased var = 2/9, std = 0.471405 -> z = [0.707107, -1.414214, ...]
    # group 9: one sample -> 0 (no baseline)
    z = group_zscore_advantage(REWARDS, GROUPS, eps=0.0)
    h = math.sqrt(3) / 2
    assert z.tolist() == pytest.approx([h, S3, -h, -h, -2 * S3, 0.0, S3, h], abs=1e-6)
    zb = group_zscore_advantage(REWARDS, GROUPS, eps=0.0, unbiased=False)
    r2 = 1 / math.sqrt(2)
    assert zb.tolist() == pytest.approx([1, r2, -1, -1, -2 * r2, 0, r2, 1], abs=1e-6)
    # std epsilon: 0.5 / (0.577350 + 0.1) = 0.738197
    assert group_zscore_advantage(REWARDS, GROUPS, eps=0.1)[0].item() == pytest.approx(0.5 / (S3 + 0.1), abs=1e-6)
    # Dr. GRPO: deviations only
    assert group_mean_advantage(REWARDS, GROUPS).tolist() == pytest.approx(
        [0.5, 1 / 3, -0.5, -0.5, -2 / 3, 0.0, 1 / 3, 0.5], abs=1e-6)
    # RLOO: R_i - mean of the others; row 0: 1 - (0 + 0 + 1)/3 = 2/3; row 4: 0 - (1 + 1)/2 = -1; row 1: 1 - 1/2
    assert rloo_advantage(REWARDS, GROUPS).tolist() == pytest.approx(
        [2 / 3, 0.5, -2 / 3, -2 / 3, -1.0, 0.0, 0.5, 2 / 3], abs=1e-6)


def test_registry_broadcasts_to_tokens_and_whitens():
    mask = torch.tensor([[0, 1, 1, 0], [0, 1, 0, 0], [1, 1, 1, 1]], dtype=torch.float32)
    x = AdvantageInputs(rewards=torch.tensor([1.0, 0.0, 1.0]), mask=mask, group=torch.tensor([0, 0, 0]))
    adv, returns = compute_advantages("group_mean", AdvantageParams(), x)
    # mean 2/3: A = [1/3, -2/3, 1/3] on every loss token, 0 elsewhere
    assert returns is None
    expected = torch.tensor([[0, 1 / 3, 1 / 3, 0], [0, -2 / 3, 0, 0], [1 / 3] * 4])
    assert torch.allclose(adv, expected, atol=1e-6)
    # with whitening afterwards: the estimator's output whitened over the loss tokens
    white, _ = compute_advantages("group_mean", AdvantageParams(whiten=True), x)
    assert torch.allclose(white, whiten(adv, mask))
    assert (white * mask).sum().item() == pytest.approx(0.0, abs=1e-6)
    # batch_norm: R = [1, 0, 1] over the batch: mean 2/3, unbiased var 1/3 -> [0.57735, -1.1547, 0.57735] (eps 1e-6)
    bn, _ = compute_advantages("batch_norm", AdvantageParams(), x)
    assert bn[:, 1].tolist() == pytest.approx([S3, -2 * S3, S3], abs=1e-5)
    with pytest.raises(ValueError, match="one reward per sample"):
        compute_advantages("group_zscore", AdvantageParams(), AdvantageInputs(rewards=mask, mask=mask, group=x.group))
    assert set(ADVANTAGES.names()) >= {"group_zscore", "group_mean", "rloo", "batch_norm", "gae"}


def test_gae_by_hand():
    # V = [0.5, 0.2, 0.1], r = [0, 0, 1], gamma 1, lambda 0.5, V after the last token = 0:
    # delta = [0 + 0.2 - 0.5, 0 + 0.1 - 0.2, 1 + 0 - 0.1] = [-0.3, -0.1, 0.9]
    # A_2 = 0.9; A_1 = -0.1 + 0.5 * 0.9 = 0.35; A_0 = -0.3 + 0.5 * 0.35 = -0.125; returns = A + V = [0.375, 0.55, 1.0]
    # (the row has a prompt position before and a padding position after, both 0)
    values = torch.tensor([[9.0, 0.5, 0.2, 0.1, 7.0]])
    rewards = torch.tensor([[0.0, 0.0, 0.0, 1.0, 0.0]])
    mask = torch.tensor([[0.0, 1, 1, 1, 0]])
    adv, ret = gae(rewards, values, mask, gamma=1.0, lam=0.5)
    assert adv.tolist()[0] == pytest.approx([0, -0.125, 0.35, 0.9, 0], abs=1e-6)
    assert ret.tolist()[0] == pytest.approx([0, 0.375, 0.55, 1.0, 0], abs=1e-6)
    with pytest.raises(ValueError, match="contiguous"):
        gae(rewards, values, torch.tensor([[1.0, 0, 1, 1, 0]]), 1.0, 0.5)


def gae_loop(rewards, values, mask, gamma, lam):
    """Reference: a reverse loop over each row's loss tokens."""
    adv, ret = torch.zeros_like(values), torch.zeros_like(values)
    for i in range(values.shape[0]):
        idx = [t for t in range(values.shape[1]) if mask[i, t] > 0]
        last = 0.0
        for k in reversed(range(len(idx))):
            t = idx[k]
            v_next = values[i, idx[k + 1]].item() if k + 1 < len(idx) else 0.0
            delta = rewards[i, t].item() + gamma * v_next - values[i, t].item()
            last = delta + gamma * lam * last
            adv[i, t], ret[i, t] = last, last + values[i, t].item()
    return adv, ret


@pytest.mark.parametrize("gamma,lam", [(0.99, 0.95), (1.0, 1.0), (1.0, 0.0), (0.9, 0.3)])
def test_gae_equals_reverse_loop_on_ragged_rows(gamma, lam):
    torch.manual_seed(1)
    b, length = 6, 300                    # longer than one 256-position block: the carry between blocks is tested
    starts, lens = [0, 5, 17, 250, 3, 0], [300, 40, 283, 50, 1, 0]   # full row, short, long, crosses a block, 1, empty
    mask = torch.zeros(b, length, dtype=torch.float64)
    for i, (s, n) in enumerate(zip(starts, lens)):
        mask[i, s : s + n] = 1
    values = torch.randn(b, length, dtype=torch.float64)
    rewards = torch.randn(b, length, dtype=torch.float64) * 0.1
    adv, ret = gae(rewards, values, mask, gamma, lam)
    ref_adv, ref_ret = gae_loop(rewards, values, mask, gamma, lam)
    assert torch.allclose(adv, ref_adv, atol=1e-10) and torch.allclose(ret, ref_ret, atol=1e-10)
    adv32, _ = gae(rewards.float(), values.float(), mask.float(), gamma, lam)   # float32, the usual dtype
    assert torch.allclose(adv32.double(), ref_adv, atol=1e-3 * (1 + ref_adv.abs().max().item()))


def test_discounted_reverse_cumsum_small_discount_does_not_overflow():
    x = torch.ones(1, 1000)
    y = discounted_reverse_cumsum(x, 0.01)          # y_t = sum_l 0.01^l = 1 / 0.99 except at the very end
    assert torch.isfinite(y).all() and y[0, 0].item() == pytest.approx(1 / 0.99, rel=1e-6)


def test_token_rewards_k1_in_the_reward():
    # r_t = [t = last] R - beta (log pi_old - log pi_ref), beta = 0.1
    # row 0: loss tokens at 1, 2; old - ref = [ln 0.5 - ln 0.25, ln 0.4 - ln 0.4] = [0.693147, 0]
    #        -> r = [0, -0.0693147, 0 + 1.0]; row 1: one token at 1, R = 0.1, old - ref = ln 0.3 - ln 0.6 = -0.693147
    #        -> r = [0, 0.1 + 0.0693147, 0]
    mask = torch.tensor([[0.0, 1, 1], [0.0, 1, 0]])
    old = torch.log(torch.tensor([[0.9, 0.5, 0.4], [0.9, 0.3, 0.9]]))
    ref = torch.log(torch.tensor([[0.1, 0.25, 0.4], [0.1, 0.6, 0.2]]))
    r = token_rewards(torch.tensor([1.0, 0.1]), mask, old, ref, beta=0.1)
    assert r.tolist()[0] == pytest.approx([0, -0.0693147, 1.0], abs=1e-6)
    assert r.tolist()[1] == pytest.approx([0, 0.1693147, 0], abs=1e-6)
    assert token_rewards(torch.tensor([1.0, 0.1]), mask).tolist() == [[0, 0, 1.0], [0, pytest.approx(0.1), 0]]


class FakeWorld:
    """`world` threads standing in for processes; `reduce(rank)` is an all-reduce sum across them."""

    def __init__(self, world: int):
        self.world, self.barrier, self.slots = world, threading.Barrier(world), [None] * world

    def reduce(self, rank: int):
        def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
            self.slots[rank] = t.clone()
            self.barrier.wait()
            total = sum(self.slots)
            self.barrier.wait()
            return total
        return all_reduce_sum

    def run(self, fn):
        out, errors = [None] * self.world, []

        def target(rank):
            try:
                out[rank] = fn(rank)
            except BaseException as e:  # noqa: BLE001  (re-raised below)
                errors.append(e)
                self.barrier.abort()
        threads = [threading.Thread(target=target, args=(r,)) for r in range(self.world)]
        [t.start() for t in threads]
        [t.join(timeout=30) for t in threads]
        if errors:
            raise errors[0]
        return out


class FakeAccelerator:
    def __init__(self, world: FakeWorld, rank: int):
        self._reduce = world.reduce(rank)

    def reduce(self, tensor, reduction="sum"):
        assert reduction == "sum"
        return self._reduce(tensor)


def test_whitening_over_two_processes_equals_one_batch():
    torch.manual_seed(2)
    x = torch.randn(6, 9) * 3 + 1
    mask = (torch.rand(6, 9) > 0.3).float()
    mask[5] = 0                                                   # a row with no loss tokens
    whole = whiten(x, mask)
    # the two processes hold different numbers of rows and tokens: 2 rows and 4 rows
    parts = [(x[:2], mask[:2]), (x[2:], mask[2:])]
    world = FakeWorld(2)
    got = world.run(lambda r: whiten(parts[r][0], parts[r][1], world.reduce(r)))
    assert torch.allclose(torch.cat(got), whole, atol=1e-6)
    got = world.run(lambda r: whiten(parts[r][0], parts[r][1], FakeAccelerator(world, r)))   # an Accelerator
    assert torch.allclose(torch.cat(got), whole, atol=1e-6)
    # each process alone would be wrong: the split matters
    assert not torch.allclose(whiten(*parts[0]), whole[:2], atol=1e-3)
    # the whitened loss tokens have mean 0 and unbiased variance 1
    v = whole[mask > 0]
    assert v.mean().item() == pytest.approx(0, abs=1e-6) and v.var().item() == pytest.approx(1, abs=1e-6)
    # batch_norm advantages over two processes equal those over the whole batch
    rewards, group = torch.tensor([1.0, 0.0, 0.5, 2.0, 0.0, 1.0]), torch.arange(6)
    one, _ = compute_advantages("batch_norm", AdvantageParams(), AdvantageInputs(rewards, mask, group))
    two = world.run(lambda r: compute_advantages("batch_norm", AdvantageParams(), AdvantageInputs(
        rewards[:2] if r == 0 else rewards[2:], parts[r][1], group[:2] if r == 0 else group[2:],
        reduce=world.reduce(r)))[0])
    assert torch.allclose(torch.cat(two), one, atol=1e-6)


# ------------------------------------------------------------------------------------------ dynamic sampling
def test_informative_groups_by_hand():
    # group 7: [1, 0, 0, 1] varies -> kept; group 3: [1, 0, 1] varies -> kept; group 9: one sample -> dropped
    assert informative(GROUPS, REWARDS).tolist() == [True, True, True, True, True, False, True, True]
    # all-equal groups are dropped whatever the value
    assert informative(torch.tensor([0, 0, 1, 1]), torch.tensor([1.0, 1.0, 0.3, 0.3])).tolist() == [False] * 4


def rollout_batch(rewards_per_group: list[list[float]]) -> Experience:
    """A rollout-like Experience: one row per completion, group ids 0..n-1 within this batch."""
    group = torch.tensor([g for g, rs in enumerate(rewards_per_group) for _ in rs])
    rewards = torch.tensor([r for rs in rewards_per_group for r in rs], dtype=torch.float32)
    n = len(group)
    ids = torch.arange(n)[:, None].repeat(1, 3)                 # row i's tokens all equal i: provenance of rows
    return Experience(input_ids=ids, attention_mask=torch.ones(n, 3, dtype=torch.long),
                      loss_mask=torch.tensor([[0, 1, 1]] * n), source=torch.tensor([[PROMPT, POLICY, POLICY]] * n),
                      group=group, rewards=rewards, columns=[{"row": i} for i in range(n)])


def test_dynamic_sampling_fills_with_informative_groups_only():
    rounds = iter([
        rollout_batch([[1, 1], [0, 1], [0, 0]]),              # one informative group (1), two dropped
        rollout_batch([[0, 0], [0, 0], [0, 0]]),              # none
        rollout_batch([[1, 0], [1, 1], [0.5, 0], [1, 0]]),    # three informative; two are needed, one is surplus
    ])
    out = fill_batch(lambda: next(rounds), target_groups=3, max_rounds=10)
    assert (out.full, out.groups, out.rounds, out.dropped_groups, out.surplus_groups) == (True, 3, 3, 6, 1)
    kept = out.batches
    assert [len(b) for b in kept] == [2, 4]
    for b in kept:                                            # never a group with zero reward variance
        for g in b.group.unique():
            assert b.rewards[b.group == g].std() > 0
    # the kept rows are the right ones, in order: round 1 group 1 (rows 2, 3), round 3 groups 0 and 2 (rows 0, 1, 4, 5)
    assert kept[0].input_ids[:, 0].tolist() == [2, 3] and kept[1].input_ids[:, 0].tolist() == [0, 1, 4, 5]
    assert [c["row"] for c in kept[1].columns] == [0, 1, 4, 5]


def test_dynamic_sampling_stops_at_its_cap():
    calls = []

    def all_solved():
        calls.append(1)
        return rollout_batch([[1, 1, 1], [0, 0, 0]])

    out = fill_batch(all_solved, target_groups=2, max_rounds=4)
    assert (out.full, out.groups, out.rounds, out.dropped_groups, len(calls)) == (False, 0, 4, 8, 4)
    assert out.batches == []
    with pytest.raises(ValueError):
        fill_batch(all_solved, target_groups=2, max_rounds=0)
