"""Rollout experience (the counterpart of trainer.DemoBuilder): prompts -> G completions each -> rewards ->
advantages -> an Experience. One `collect()` per stage step, on every process in lockstep:

    round     the next `prompts_per_step` global prompt positions of a seeded per-epoch order (the cursor, saved in
              checkpoints, so resume is exact); this process takes its contiguous share P / W
              -> chat-templated prompt ids -> engine.generate: G completions each                  (time/generate)
              -> score_batch: every reward on every completion, called as TRL calls it             (time/reward)
    dynamic sampling (DAPO; rl/sampling.fill_batch): keep only groups whose rewards differ and run more rounds until
              every process holds P / W groups (an all-reduce decides, so the processes stay in lockstep) or the
              cap; a process still short then pads with zero-variance groups whose loss mask is empty (no loss, no
              tokens in any normaliser), so every process trains on the same shapes
    collate   prompt + completion right-padded; loss mask = completion tokens; source PROMPT / POLICY; group = the
              global prompt position; sampler_logprobs = the engine's
    teacher forcing (no grad, micro-batches, logits / T at the sampling temperature T)             (time/logprobs)
              old log-probs only when an update reuses the batch or the KL is in the reward; old values (PPO);
              reference log-probs only when a KL term is on: once per rollout batch, never per micro-batch
    advantages  R [B] (or per-token r_t = [t = last] R - beta k(old, ref) with the KL in the reward)
              -> rl/advantages.compute_advantages with the objective's estimator; whitening over all processes

Completions are rows; per-token tensors are [B, L] with L = T - 1 (position j predicts token j + 1).
"""
from __future__ import annotations

import dataclasses
import hashlib
import math
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from posttrain.configlib import ConfigError
from posttrain.data import DataConfig, EpochSampler, Example
from posttrain.experience import POLICY, PROMPT, Experience, pad_right
from posttrain.policy import forward
from posttrain.rewarding import Reward, RewardBatch, reward_metrics, score_batch
from posttrain.rl.advantages import AdvantageInputs, AdvantageParams, compute_advantages, token_rewards
from posttrain.rl.config import RolloutConfig
from posttrain.rl.sampling import fill_batch, first_groups, informative
from posttrain.rollout.base import Completion, encode_prompts

NOT_REWARD_COLUMNS = ("prompt", "completion", "completion_ids")   # passed as prompts= / completions= instead (TRL)


@dataclass(frozen=True)
class RLPlan:
    """What the stage's RL objective asks of the experience (read from its config: GRPOConfig, PPOConfig, ...)."""

    estimator: str              # advantage estimator (rl/advantages.py registry)
    params: AdvantageParams
    kl_beta: float              # beta of the KL penalty in the reward (0 = none there)
    kl_estimator: str
    reference: bool             # reference log-probs are needed (a KL term in the loss or in the reward)
    values: bool                # PPO: old values from the value head, GAE returns
    dynamic_sampling: bool
    max_rounds: int             # generation rounds per step (1 without dynamic sampling)

    @staticmethod
    def of(objective) -> "RLPlan":
        c = objective.config
        beta = getattr(c, "beta", 0.0)
        in_reward = beta > 0 and getattr(c, "kl_placement", "reward") == "reward"   # PPO: always in the reward
        dynamic = bool(getattr(c, "dynamic_sampling", False))
        return RLPlan(c.advantage, c.advantage_params, beta if in_reward else 0.0, getattr(c, "kl_estimator", "k1"),
                      "reference" in objective.needs, "values" in objective.needs, dynamic,
                      getattr(c, "max_sampling_rounds", 1) if dynamic else 1)


@dataclass
class Prompt:
    ids: list[int]              # chat-templated prompt token ids, ending in the assistant generation prompt
    prompt: Any                 # what reward functions receive: the data set's text, or its chat messages
    conversational: bool        # the data set's prompt was chat messages: completions go to rewards as messages too
    columns: dict[str, Any]     # raw columns by name (plus `answer` when mapped)


def rollout_prompts(examples: list[Example], rows: list[dict], columns: dict[str, str], tokenizer,
                    max_length: int, data: DataConfig | None = None) -> tuple[list[Prompt], int]:
    """The prompts of a data set (rendered as `data` says), and how many were dropped for being longer than
    `max_length` tokens."""
    ids = encode_prompts(tokenizer, [ex.prompt for ex in examples], data)
    role = next((columns[r] for r in ("messages", "prompt") if r in columns),
                next((r for r in ("messages", "prompt") if r in rows[0]), None))
    out = []
    for ex, row, p in zip(examples, rows, ids):
        if len(p) > max_length:
            continue
        chat = isinstance(row.get(role), list)
        cols = {k: v for k, v in ex.columns.items() if k not in NOT_REWARD_COLUMNS}
        out.append(Prompt(p, ex.prompt if chat else row.get(role), chat, cols))
    return out, len(examples) - len(out)


@dataclass
class Samples:
    """Completions of one or more rounds, one row each: what dynamic sampling selects from."""

    prompts: list[Prompt]           # [B] the row's prompt
    completions: list[Completion]   # [B]
    rewards: Tensor                 # [B] float32 total reward R
    group: Tensor                   # [B] long: global prompt position
    active: Tensor                  # [B] bool: False = a padding group (no loss)

    def select(self, rows) -> "Samples":
        rows = torch.as_tensor(rows, dtype=torch.long)
        idx = rows.tolist()
        return Samples([self.prompts[i] for i in idx], [self.completions[i] for i in idx], self.rewards[rows],
                       self.group[rows], self.active[rows])

    @staticmethod
    def cat(parts: list["Samples"]) -> "Samples":
        return Samples([p for s in parts for p in s.prompts], [c for s in parts for c in s.completions],
                       torch.cat([s.rewards for s in parts]), torch.cat([s.group for s in parts]),
                       torch.cat([s.active for s in parts]))


@dataclass
class StepLog:
    """Per-step records, already gathered over processes (so every process computes the same metrics)."""

    totals: list[float] = field(default_factory=list)
    values: dict[str, list[float | None]] = field(default_factory=dict)
    errors: dict[str, float] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    lengths: list[int] = field(default_factory=list)
    clipped: int = 0
    groups: int = 0
    zero_std_groups: int = 0
    time: dict[str, float] = field(default_factory=dict)
    sampling: dict[str, float] = field(default_factory=dict)

    def add_time(self, phase: str, seconds: float) -> None:
        self.time[phase] = self.time.get(phase, 0.0) + seconds


class RolloutBuilder:
    """Rollout batches for one RL stage; see the module docstring. `collect()` on every process together."""

    def __init__(self, prompts: list[Prompt], cfg: RolloutConfig, plan: RLPlan, rewards: list[Reward], engine,
                 tokenizer, accelerator, seed: int, micro_batch_size: int):
        self.prompts, self.cfg, self.plan, self.rewards, self.engine = prompts, cfg, plan, rewards, engine
        self.acc, self.seed, self.micro = accelerator, seed, micro_batch_size
        self.pad_id = tokenizer.pad_token_id
        self.rank, self.world = accelerator.process_index, accelerator.num_processes
        self.share = cfg.prompts_per_step // self.world          # prompts (= groups) per process per round
        self.sampler = EpochSampler(len(prompts), seed)
        self.temperature = cfg.sampling.temperature or 1.0       # greedy sampling is scored at T = 1
        self.cursor = 0                                           # global prompt position of the next round
        self.log = StepLog()

    @property
    def reuses_batch(self) -> bool:
        """An update that is not the first on this batch needs pi_old recorded at collection."""
        return self.cfg.updates_per_step > 1

    # ------------------------------------------------------------------------------------------------ a step
    def collect(self, policy: torch.nn.Module, ref: torch.nn.Module | None) -> tuple[Experience, dict]:
        """This process's share of one rollout batch, with everything the objective reads, and the step's metrics.
        `policy` is the unwrapped module (no-grad teacher forcing); `ref` the frozen reference, if any."""
        self.log = StepLog()
        samples = self.fill() if self.plan.dynamic_sampling else self.sample_round()
        exp = self.collate(samples)
        started = time.perf_counter()
        self.teacher_force(exp, policy, ref)
        self.log.add_time("logprobs", time.perf_counter() - started)
        self.advantages(exp)
        return exp, self.metrics()

    def mini_batches(self, exp: Experience) -> list[Experience]:
        """The optimizer steps of one pass: mini-batch k holds rows k, k + K, k + 2K, ... of every process, so the
        global mini-batches are the same for any number of processes (K = batch / mini_batch_size)."""
        k = self.cfg.completions_per_step // (self.cfg.mini_batch_size or self.cfg.completions_per_step)
        return [exp.select(list(range(i, len(exp), k))) for i in range(k)]

    def state_dict(self) -> dict:
        return {"cursor": self.cursor}

    def load_state_dict(self, state: dict) -> None:
        self.cursor = int(state.get("cursor", 0))

    def close(self) -> None:
        self.engine.close()
        for reward in self.rewards:
            reward.close()

    # ---------------------------------------------------------------------------------------------- rounds
    def sample_round(self) -> Samples:
        """The next `prompts_per_step` global prompts: this process's share, G completions each, scored."""
        first = self.cursor + self.rank * self.share
        positions = list(range(first, first + self.share))
        items = [self.prompts[i] for i in self.sampler.indices(first, self.share)]
        self.cursor += self.cfg.prompts_per_step
        started = time.perf_counter()
        completions = self.generate(items, positions)                       # [share][G]
        self.log.add_time("generate", time.perf_counter() - started)
        rows = [(item, c, pos) for item, group, pos in zip(items, completions, positions) for c in group]
        started = time.perf_counter()
        scored = self.score([r[0] for r in rows], [r[1] for r in rows])
        self.log.add_time("reward", time.perf_counter() - started)
        samples = Samples([r[0] for r in rows], [r[1] for r in rows], torch.tensor(scored.total, dtype=torch.float32),
                          torch.tensor([r[2] for r in rows], dtype=torch.long), torch.ones(len(rows), dtype=torch.bool))
        self.record(samples, scored)
        return samples

    def generate(self, items: list[Prompt], positions: list[int]) -> list[list[Completion]]:
        """Seeded, so a step's completions depend only on the data position (exact resume): with sampling.seed null
        one batched call per process; with a seed one call per prompt, identical for any number of processes."""
        s = self.cfg.sampling
        if s.seed is None:
            seeded = dataclasses.replace(s, seed=_seed(self.seed, positions[0]))     # one stream per process and round
            return self.engine.generate([p.ids for p in items], seeded)
        return [self.engine.generate([p.ids], dataclasses.replace(s, seed=_seed(s.seed, pos)))[0]
                for p, pos in zip(items, positions)]

    def score(self, prompts: list[Prompt], completions: list[Completion]) -> RewardBatch:
        """Every reward on every completion (TRL's call: chat messages in, chat messages out; columns by name)."""
        texts = [[{"role": "assistant", "content": c.text}] if p.conversational else c.text
                 for p, c in zip(prompts, completions)]
        columns = {k: [p.columns.get(k) for p in prompts] for k in prompts[0].columns}
        return score_batch(self.rewards, [p.prompt for p in prompts], texts, columns,
                           completion_ids=[c.token_ids for c in completions])

    def fill(self) -> Samples:
        """DAPO dynamic sampling in lockstep: rounds until every process holds `share` informative groups, or the
        cap."""
        kept, rounds, have, dropped = [], [], 0, 0
        while True:
            batch = self.sample_round()
            rounds.append(batch)
            if have < self.share:                                            # fill_batch on this round only
                got = fill_batch(lambda: batch, self.share - have, 1)
                kept, have, dropped = kept + got.batches, have + got.groups, dropped + got.dropped_groups
            everyone_full = self.reduce(torch.tensor(float(have >= self.share)), "min") > 0
            if everyone_full or len(rounds) >= self.plan.max_rounds:
                break
        short = self.share - have
        if short > 0:                                                        # cap reached: pad with no-loss groups
            pool = Samples.cat(rounds)
            pad = pool.select(first_groups(pool.group, ~informative(pool.group, pool.rewards), short))
            kept.append(Samples(pad.prompts, pad.completions, pad.rewards, pad.group, torch.zeros_like(pad.active)))
        counts = self.reduce(torch.tensor([float(dropped), float(short)]), "sum")
        self.log.sampling = {"sampling/rounds": float(len(rounds)), "sampling/dropped_groups": float(counts[0]),
                             "sampling/padded_groups": float(counts[1])}
        return Samples.cat(kept)

    # ------------------------------------------------------------------------------------------ experience
    def collate(self, s: Samples) -> Experience:
        """Right-padded prompt + completion rows; the loss mask covers the completion (none for inactive rows, or
        for truncated ones with rollout.mask_truncated)."""
        lens = [(len(p.ids), len(c.token_ids)) for p, c in zip(s.prompts, s.completions)]
        live = [bool(a) and not (self.cfg.mask_truncated and c.finish_reason == "length")
                for a, c in zip(s.active.tolist(), s.completions)]
        input_ids = pad_right([p.ids + c.token_ids for p, c in zip(s.prompts, s.completions)], self.pad_id)   # [B, T]
        width = input_ids.shape[1]
        attention = pad_right([[1] * (a + b) for a, b in lens], 0, width)                                    # [B, T]
        completion = pad_right([[0] * a + [1] * b for a, b in lens], 0, width)                               # [B, T]
        loss_mask = completion * torch.tensor(live, dtype=torch.long)[:, None]                               # [B, T]
        sampler = torch.zeros(len(lens), width - 1)                                                          # [B, L]
        for i, ((a, b), c) in enumerate(zip(lens, s.completions)):
            sampler[i, a - 1 : a - 1 + b] = torch.tensor(c.logprobs, dtype=torch.float32)
        source = torch.where(completion.bool(), POLICY, PROMPT) * attention
        return Experience(input_ids=input_ids, attention_mask=attention, loss_mask=loss_mask, source=source,
                          group=s.group, sampler_logprobs=sampler, rewards=s.rewards,
                          columns=[p.columns for p in s.prompts])

    def teacher_force(self, exp: Experience, policy: torch.nn.Module, ref: torch.nn.Module | None) -> None:
        """pi_old (only when needed), V_old (PPO) and pi_ref (only with a KL term), all at the sampling temperature."""
        if self.reuses_batch or self.plan.kl_beta > 0 or self.plan.values:
            exp.old_logprobs, exp.values = self.scored(policy, exp)
        if self.plan.reference:
            if ref is None:
                raise RuntimeError("the objective has a KL term but the trainer built no reference model")
            exp.ref_logprobs, _ = self.scored(ref, exp)

    @torch.no_grad()
    def scored(self, model: torch.nn.Module, exp: Experience) -> tuple[Tensor, Tensor | None]:
        """Teacher-forced log-probs [B, L] (and values [B, L] if the model has a value head), in micro-batches."""
        logps, values = torch.zeros(exp.targets.shape), None
        for start in range(0, len(exp), self.micro):
            mb = exp.select(slice(start, start + self.micro)).trimmed().to(self.acc.device)
            with self.acc.autocast():
                out = forward(model, mb, self.temperature)
            rows, width = slice(start, start + len(mb)), out.logprobs.shape[1]
            logps[rows, :width] = out.logprobs.float().cpu()
            if out.values is not None:
                values = torch.zeros(exp.targets.shape) if values is None else values
                values[rows, :width] = out.values.float().cpu()
        return logps, values

    def advantages(self, exp: Experience) -> None:
        """A [B, L] (and returns for PPO) from R, with the KL penalty in the reward when the objective puts it there."""
        p, mask = self.plan, exp.target_mask                                             # [B, L] loss tokens
        rewards: Tensor = exp.rewards                                                    # [B] R
        if p.kl_beta > 0 or p.estimator == "gae":
            completion = ((exp.source[:, 1:] == POLICY) & exp.attention_mask[:, 1:].bool()).float()   # [B, L]
            per_token = token_rewards(exp.rewards, completion, exp.old_logprobs, exp.ref_logprobs, p.kl_beta,
                                      p.kl_estimator)                                    # [B, L] r_t
            rewards = per_token if p.estimator == "gae" else per_token.sum(-1)            # [B, L] or [B]
        exp.advantages, exp.returns = compute_advantages(
            p.estimator, p.params, AdvantageInputs(rewards, mask, exp.group, exp.values, reduce=self.acc))

    # ---------------------------------------------------------------------------------------------- metrics
    def record(self, s: Samples, scored: RewardBatch) -> None:
        """Gather one round's rewards, lengths and group statistics over processes (equal sizes every round)."""
        log = self.log
        log.totals += self.gather(torch.tensor(scored.total, dtype=torch.float64)).tolist()
        for label, vals in scored.values.items():
            got = self.gather(torch.tensor([math.nan if v is None else v for v in vals], dtype=torch.float64))
            log.values.setdefault(label, []).extend(None if math.isnan(v) else v for v in got.tolist())
        labels = sorted(scored.values)
        errors = self.reduce(torch.tensor([float(sum(e.reward == k for e in scored.errors)) for k in labels]), "sum")
        seconds = self.reduce(torch.tensor([scored.seconds.get(k, 0.0) for k in labels]), "max")
        for k, e, sec in zip(labels, errors.tolist(), seconds.tolist()):
            log.errors[k], log.seconds[k] = log.errors.get(k, 0.0) + e, log.seconds.get(k, 0.0) + sec
        lengths = torch.tensor([len(c.token_ids) for c in s.completions])
        clipped = torch.tensor([c.finish_reason == "length" for c in s.completions], dtype=torch.float64)
        log.lengths += self.gather(lengths).tolist()
        n_groups = len(torch.unique(s.group))
        zero = n_groups - len(torch.unique(s.group[informative(s.group, s.rewards)]))
        counts = self.reduce(torch.tensor([clipped.sum().item(), float(n_groups), float(zero)]), "sum")
        log.clipped, log.groups, log.zero_std_groups = (log.clipped + int(counts[0]), log.groups + int(counts[1]),
                                                        log.zero_std_groups + int(counts[2]))

    def metrics(self) -> dict[str, float]:
        """The step's metrics, exact over all processes and over every completion sampled in the step (every round
        of dynamic sampling, kept or not): reward/mean, reward/std and reward/<fn>/{mean,std,abstained,errors,
        seconds} (rewarding.reward_metrics), frac_reward_zero_std (groups), completion/{mean,min,max}_length and
        completion/clipped_ratio (cut at max_new_tokens), sampling/{rounds,dropped_groups,padded_groups} (dynamic
        sampling), time/{generate,reward,logprobs} (the slowest process), epoch (prompts drawn / data set size)."""
        log = self.log
        batch = RewardBatch(log.totals, log.values, [], log.seconds)
        out = reward_metrics(batch) | {f"reward/{k}/errors": v for k, v in log.errors.items()}
        n = max(len(log.lengths), 1)
        out |= {"frac_reward_zero_std": log.zero_std_groups / max(log.groups, 1),
                "completion/mean_length": sum(log.lengths) / n, "completion/min_length": float(min(log.lengths)),
                "completion/max_length": float(max(log.lengths)), "completion/clipped_ratio": log.clipped / n}
        times = self.reduce(torch.tensor([log.time.get(k, 0.0) for k in ("generate", "reward", "logprobs")]), "max")
        out |= {f"time/{k}": float(v) for k, v in zip(("generate", "reward", "logprobs"), times)}
        return out | log.sampling | {"epoch": self.cursor / len(self.prompts)}

    # ------------------------------------------------------------------------------------ collectives
    def gather(self, t: Tensor) -> Tensor:
        """Concatenation over processes of equal-sized 1-D tensors (process order)."""
        return self.acc.gather(t.to(self.acc.device)).cpu() if self.world > 1 else t

    def reduce(self, t: Tensor, op: str) -> Tensor:
        """Element-wise sum / min / max over processes."""
        if self.world == 1:
            return t
        if op == "sum":
            return self.acc.reduce(t.to(self.acc.device, torch.float64), "sum").cpu()
        stacked = self.acc.gather(t.to(self.acc.device, torch.float64)[None]).cpu()          # [W, ...]
        return stacked.amin(0) if op == "min" else stacked.amax(0)


def check_world(cfg: RolloutConfig, world: int, where: str, source: str) -> None:
    """prompts_per_step and mini_batch_size split evenly over the processes."""
    if cfg.prompts_per_step % world:
        raise ConfigError(f"{source}: {where}.prompts_per_step ({cfg.prompts_per_step}) must be a multiple of the "
                          f"number of processes ({world})")
    if cfg.mini_batch_size is not None and cfg.mini_batch_size % world:
        raise ConfigError(f"{source}: {where}.mini_batch_size ({cfg.mini_batch_size}) must be a multiple of the "
                          f"number of processes ({world})")


def _seed(*parts: int) -> int:
    """A sampling seed derived from integers (stable across runs, platforms and process counts)."""
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "big") % 2**63
