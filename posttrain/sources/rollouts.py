"""Rollout experience: prompts -> G completions each (some continuing a demonstration, one possibly the demonstration
itself) -> rewards -> advantages -> an Experience. One `collect()` per stage step that reads rollouts, on every
process in lockstep:

    round     the next `prompts_per_step` global prompt positions of a seeded per-epoch order (the cursor, saved in
              checkpoints, so resume is exact); this process takes its contiguous share P / W
              -> chat-templated prompt ids -> rows, as the objective's RolloutPlan asks:             (time/generate)
                   G - k rollouts from the prompt (+ the UFT hint when the plan has HintSampling)
                   k rollouts continuing a demonstration prefix, one each (Prefix-RFT: PrefixSampling.prefixed = k)
                   the demonstration itself (LUFFY: demos_in_group = 1)
              -> score_batch: every reward on every row, called as TRL calls it                    (time/reward)
    dynamic sampling (DAPO; rl/sampling.fill_batch): keep only groups whose rewards differ and run more rounds until
              every process holds P / W groups (an all-reduce decides, so the processes stay in lockstep) or the
              cap; a process still short then pads with zero-variance groups whose loss mask is empty (no loss, no
              tokens in any normaliser), so every process trains on the same shapes
    collate   prompt + prefix + completion right-padded; loss mask = prefix + completion; source PROMPT / PREFIX /
              POLICY (DEMO for a demonstration row); group = the global prompt position; sampler_logprobs = the
              engine's (NaN on tokens it did not sample)
    teacher forcing (no grad, micro-batches, logits / T at the sampling temperature T)             (time/logprobs)
              old log-probs only when an update reuses the batch or the KL is in the reward; old values (PPO);
              reference log-probs only when a KL term is on; prefix-token entropies when Prefix-RFT masks them:
              once per rollout batch, never per micro-batch. When the batch is used for one update, pi_old of every
              token (sampled, prefix or demonstration) is the current policy, detached, inside the objective: the
              value teacher forcing before the update gives, as in the authors' verl code.
    advantages  R [B] (or per-token r_t = [t = last] R - beta k(old, ref) with the KL in the reward)
              -> rl/advantages.compute_advantages with the objective's estimator over each group (every row of a
              prompt: plain, prefixed and demonstration rows alike); whitening over all processes; Prefix-RFT's
              entropy mask zeroes A on the chosen prefix tokens

Rows are completions; per-token tensors are [B, L] with L = T - 1 (position j predicts token j + 1).
"""
from __future__ import annotations

import dataclasses
import hashlib
import math
import random
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from posttrain.configlib import ConfigError
from posttrain.data import NOT_REWARD_COLUMNS, DataConfig, EpochSampler, Example, demo_completion_ids
from posttrain.experience import DEMO, POLICY, PREFIX, PROMPT, Experience, GroupOutcome, pad_right
from posttrain.policy import forward
from posttrain.rewarding import Reward, RewardBatch, reward_metrics, score_batch
from posttrain.rl.advantages import AdvantageInputs, compute_advantages, token_rewards
from posttrain.rl.config import RolloutConfig
from posttrain.rl.sampling import fill_batch, first_groups, informative
from posttrain.rollout.base import Completion, encode_prompts
from posttrain.schedules import schedule_value
from posttrain.sources.guidance import draw_hint, draw_ratio, lowest_fraction, prefix_length, solution_steps
from posttrain.sources.plan import RolloutPlan


@dataclass
class Prompt:
    ids: list[int]              # chat-templated prompt token ids, ending in the assistant generation prompt
    prompt: Any                 # what reward functions receive: the data set's text, or its chat messages
    conversational: bool        # the data set's prompt was chat messages: completions go to rewards as messages too
    columns: dict[str, Any]     # raw columns by name (plus `answer` when mapped)
    demo: str | None = None     # the demonstration text (only when the plan reads demonstrations)
    demo_ids: list[int] | None = None   # its response tokens, through the end-of-turn token
    row: int = 0                # index of the example in its data set (the same row its demonstration has)


def rollout_prompts(examples: list[Example], tokenizer, data: DataConfig,
                    demos: bool = False) -> tuple[list[Prompt], int]:
    """The prompts of a data set, rendered as `data` says (chat template and its kwargs, or a prompt template), with
    their demonstrations when `demos`; and how many were dropped for being longer than data.max_length tokens."""
    ids = encode_prompts(tokenizer, [ex.prompt for ex in examples], data)
    out = []
    for i, (ex, p) in enumerate(zip(examples, ids)):
        if len(p) > data.max_length:
            continue
        cols = {k: v for k, v in ex.columns.items() if k not in NOT_REWARD_COLUMNS}
        demo_ids = demo_completion_ids(tokenizer, ex, data) if demos else None
        out.append(Prompt(p, ex.reward_prompt(), ex.conversational, cols, ex.completion if demos else None,
                          demo_ids, i))
    return out, len(examples) - len(out)


@dataclass
class Row:
    """One member of a group: the prompt, a prefix the policy continued (or none), and the completion."""

    prompt: Prompt
    completion: Completion      # what the policy wrote; for a demonstration row the demonstration
    prefix: list[int]           # demonstration tokens placed before the completion (Prefix-RFT prefix, UFT hint)
    kind: int                   # provenance of the completion's tokens: POLICY, or DEMO for a demonstration row
    prefix_is_response: bool    # the prefix is part of the response the rewards read (Prefix-RFT: yes; UFT: a setting)


@dataclass
class Samples:
    """Rows of one or more rounds: what dynamic sampling selects from."""

    rows: list[Row]             # [B]
    rewards: Tensor             # [B] float32 total reward R
    group: Tensor               # [B] long: global prompt position
    active: Tensor              # [B] bool: False = a padding group (no loss)

    def select(self, rows) -> "Samples":
        rows = torch.as_tensor(rows, dtype=torch.long)
        return Samples([self.rows[i] for i in rows.tolist()], self.rewards[rows], self.group[rows], self.active[rows])

    @staticmethod
    def cat(parts: list["Samples"]) -> "Samples":
        return Samples([r for s in parts for r in s.rows], torch.cat([s.rewards for s in parts]),
                       torch.cat([s.group for s in parts]), torch.cat([s.active for s in parts]))


@dataclass
class StepLog:
    """Per-step records, already gathered over processes (so every process computes the same metrics)."""

    totals: list[float] = field(default_factory=list)
    values: dict[str, list[float | None]] = field(default_factory=dict)
    errors: dict[str, float] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    lengths: list[int] = field(default_factory=list)
    demo_rewards: list[float] = field(default_factory=list)
    clipped: int = 0
    groups: int = 0
    zero_std_groups: int = 0
    time: dict[str, float] = field(default_factory=dict)
    extra: dict[str, float] = field(default_factory=dict)   # dynamic sampling and guidance metrics

    def add_time(self, phase: str, seconds: float) -> None:
        self.time[phase] = self.time.get(phase, 0.0) + seconds


class RolloutBuilder:
    """Rollout batches for one stage; see the module docstring. `collect()` on every process together."""

    def __init__(self, prompts: list[Prompt], cfg: RolloutConfig, plan: RolloutPlan, rewards: list[Reward], engine,
                 tokenizer, accelerator, seed: int, micro_batch_size: int, layout: str):
        self.prompts, self.cfg, self.plan, self.rewards, self.engine = prompts, cfg, plan, rewards, engine
        self.acc, self.seed, self.micro, self.tokenizer = accelerator, seed, micro_batch_size, tokenizer
        self.layout = layout                                      # policy.forward's layout of the scoring passes
        self.pad_id = tokenizer.pad_token_id
        self.rank, self.world = accelerator.process_index, accelerator.num_processes
        self.share = cfg.prompts_per_step // self.world          # prompts (= groups) per process per round
        self.sampler = EpochSampler(len(prompts), seed)
        self.temperature = cfg.sampling.temperature or 1.0       # greedy sampling is scored at T = 1
        self.cursor = 0                                           # global prompt position of the next round
        self.step = 0                                             # stage step of the batch being built (schedules)
        self.log = StepLog()
        self.outcomes: list[GroupOutcome] = []                    # the last batch's groups, all processes

    @property
    def reuses_batch(self) -> bool:
        """An update that is not the first on this batch needs pi_old recorded at collection."""
        return self.cfg.updates_per_step > 1

    @property
    def rows_per_group(self) -> int:
        return self.cfg.sampling.n + self.plan.demos_in_group

    # ------------------------------------------------------------------------------------------------ a step
    def collect(self, policy: torch.nn.Module, ref: torch.nn.Module | None, step: int = 0) -> tuple[Experience, dict]:
        """This process's share of one rollout batch for stage step `step`, with everything the objective reads, and
        the step's metrics. `policy` is the unwrapped module (no-grad teacher forcing); `ref` the frozen reference."""
        self.log, self.step = StepLog(), step
        samples = self.fill() if self.plan.dynamic_sampling else self.sample_round()
        self.outcomes = self.group_outcomes(samples)
        exp = self.collate(samples)
        started = time.perf_counter()
        entropies = self.teacher_force(exp, policy, ref)
        self.log.add_time("logprobs", time.perf_counter() - started)
        self.advantages(exp, entropies)
        self.log.extra |= self.provenance_metrics(exp)
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
        """The next `prompts_per_step` global prompts: this process's share, each a group of rows, scored."""
        first = self.cursor + self.rank * self.share
        positions = list(range(first, first + self.share))
        items = [self.prompts[i] for i in self.sampler.indices(first, self.share)]
        self.cursor += self.cfg.prompts_per_step
        started = time.perf_counter()
        groups = self.group_rows(items, positions)                          # [share][rows per group]
        self.log.add_time("generate", time.perf_counter() - started)
        rows = [(r, pos) for group, pos in zip(groups, positions) for r in group]
        started = time.perf_counter()
        scored = self.score([r for r, _ in rows])
        self.log.add_time("reward", time.perf_counter() - started)
        samples = Samples([r for r, _ in rows], torch.tensor(scored.total, dtype=torch.float32),
                          torch.tensor([pos for _, pos in rows], dtype=torch.long),
                          torch.ones(len(rows), dtype=torch.bool))
        self.record(samples, scored)
        return samples

    def group_rows(self, items: list[Prompt], positions: list[int]) -> list[list[Row]]:
        """Each prompt's group: plain (or hinted) rollouts, then prefixed rollouts, then the demonstration."""
        p, s = self.plan, self.cfg.sampling
        prefixed = p.prefixes.prefixed if p.prefixes else 0
        hints = [self.hint(item, pos) for item, pos in zip(items, positions)] if p.hints else [[] for _ in items]
        in_response = bool(p.hints and p.hints.in_response)
        plain = self.generate(items, positions, s.n - prefixed, hints, stream=0) if s.n > prefixed else \
            [[] for _ in items]
        groups = [[Row(item, c, h, POLICY, in_response) for c in cs] for item, cs, h in zip(items, plain, hints)]
        if prefixed:
            prefixes = [[self.prefix(item, pos, j) for j in range(prefixed)] for item, pos in zip(items, positions)]
            flat_items = [item for item in items for _ in range(prefixed)]
            flat_pos = [pos for pos in positions for _ in range(prefixed)]
            done = self.generate(flat_items, flat_pos, 1, [x for xs in prefixes for x in xs], stream=1)
            for i, item in enumerate(items):
                groups[i] += [self.truncated(Row(item, done[i * prefixed + j][0], prefixes[i][j], POLICY, True))
                              for j in range(prefixed)]
        for group, item in zip(groups, items):
            group += [self.demo_row(item) for _ in range(p.demos_in_group)]
        return groups

    def generate(self, items: list[Prompt], positions: list[int], n: int, prefixes: list[list[int]],
                 stream: int) -> list[list[Completion]]:
        """n completions of each prompt (+ prefix), seeded so a step's completions depend only on the data position
        (exact resume): with sampling.seed null one batched call per process; with a seed one call per prompt,
        identical for any number of processes. `stream` separates the plain and the prefixed calls of a round."""
        s = dataclasses.replace(self.cfg.sampling, n=n)
        pre = prefixes if any(prefixes) else None
        if s.seed is None:
            base = (self.seed, positions[0]) + ((stream,) if stream else ())
            return self.engine.generate([p.ids for p in items], dataclasses.replace(s, seed=_seed(*base)), pre)
        out, slot = [], {}
        for j, (p, pos) in enumerate(zip(items, positions)):     # one stream per prompt (and prefix slot)
            slot[pos] = slot.get(pos, -1) + 1
            key = (s.seed, pos) + ((stream, slot[pos]) if stream else ())
            one = self.engine.generate([p.ids], dataclasses.replace(s, seed=_seed(*key)), [pre[j]] if pre else None)
            out.append(one[0])
        return out

    def prefix(self, item: Prompt, position: int, slot: int) -> list[int]:
        """Prefix-RFT: the first int(l |y*|) demonstration tokens, l ~ U[low(s), high(s)] (guidance.prefix_length)."""
        p = self.plan.prefixes
        rng = random.Random(_seed(self.seed, position, 1, slot))
        content = item.demo_ids[:-1]                                         # y* without its end-of-turn
        ratio = draw_ratio(*p.bounds(self.step), rng)
        self.log.extra.setdefault("prefix/ratio", []).append(ratio)
        return content[: prefix_length(ratio, len(content), p.min_tokens)]

    def hint(self, item: Prompt, position: int) -> list[int]:
        """UFT: the first separation[k] solution steps as tokens (guidance.draw_hint)."""
        h = self.plan.hints
        rng = random.Random(_seed(self.seed, position, 2))
        steps = solution_steps(item.demo)
        text = draw_hint(steps, schedule_value(h.probability, self.step), h.max_splits, rng)
        self.log.extra.setdefault("hint/fraction", []).append(len(text) / max(len(item.demo), 1))
        return self.tokenizer(text, add_special_tokens=False)["input_ids"] if text else []

    def demo_row(self, item: Prompt) -> Row:
        """LUFFY: the demonstration (+ end-of-turn) as a member of the group, with no sampler log-probs."""
        ids = list(item.demo_ids)
        text = self.tokenizer.decode(ids, skip_special_tokens=True)
        return Row(item, Completion(ids, text, [math.nan] * len(ids), "stop"), [], DEMO, False)

    def truncated(self, row: Row) -> Row:
        """A prefixed row whose prefix + continuation exceeds max_new_tokens, cut there (finish_reason 'length')."""
        budget = self.cfg.sampling.max_new_tokens - len(row.prefix)
        c = row.completion
        if len(c.token_ids) <= budget:
            return row
        ids = c.token_ids[: max(budget, 0)]
        cut = Completion(ids, self.tokenizer.decode(ids, skip_special_tokens=True), c.logprobs[: len(ids)], "length",
                         c.prompt_index, c.raw_logprobs[: len(ids)] if c.raw_logprobs is not None else None)
        return dataclasses.replace(row, completion=cut)

    def response_text(self, row: Row) -> str:
        if row.prefix and row.prefix_is_response:
            return self.tokenizer.decode(row.prefix + row.completion.token_ids, skip_special_tokens=True)
        return row.completion.text

    def score(self, rows: list[Row]) -> RewardBatch:
        """Every reward on every row (TRL's call: chat messages in, chat messages out; columns by name)."""
        prompts = [r.prompt for r in rows]
        texts = [self.response_text(r) for r in rows]
        texts = [[{"role": "assistant", "content": t}] if p.conversational else t for p, t in zip(prompts, texts)]
        columns = {k: [p.columns.get(k) for p in prompts] for k in prompts[0].columns}
        return score_batch(self.rewards, [p.prompt for p in prompts], texts, columns,
                           completion_ids=[(r.prefix if r.prefix_is_response else []) + r.completion.token_ids
                                           for r in rows])

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
            kept.append(Samples(pad.rows, pad.rewards, pad.group, torch.zeros_like(pad.active)))
        counts = self.reduce(torch.tensor([float(dropped), float(short)]), "sum")
        self.log.extra |= {"sampling/rounds": float(len(rounds)), "sampling/dropped_groups": float(counts[0]),
                           "sampling/padded_groups": float(counts[1])}
        return Samples.cat(kept)

    def group_outcomes(self, s: Samples) -> list[GroupOutcome]:
        """Every group of the batch over all processes (process order): its data row and its sampled rows' rewards."""
        group = s.group.tolist()
        order = list(dict.fromkeys(group))                                 # groups in order of appearance
        first = {g: group.index(g) for g in order}
        table = torch.tensor([[float(s.rows[first[g]].prompt.row)] +
                              [float(s.rewards[i]) for i in range(len(s.rows))
                               if group[i] == g and s.rows[i].kind == POLICY]
                              for g in order], dtype=torch.float64)       # [groups, 1 + G]
        table = self.gather(table.flatten()).view(-1, table.shape[1]) if self.world > 1 else table
        return [GroupOutcome(int(r[0]), r[1:].tolist()) for r in table]

    # ------------------------------------------------------------------------------------------ experience
    def collate(self, s: Samples) -> Experience:
        """Right-padded prompt + prefix + completion rows; the loss mask covers prefix and completion (none for
        inactive rows, or for truncated ones with rollout.mask_truncated)."""
        live = [bool(a) and not (self.cfg.mask_truncated and r.completion.finish_reason == "length")
                for a, r in zip(s.active.tolist(), s.rows)]
        input_ids = pad_right([r.prompt.ids + r.prefix + r.completion.token_ids for r in s.rows], self.pad_id)  # [B, T]
        width = input_ids.shape[1]
        source = pad_right([[PROMPT] * len(r.prompt.ids) + [PREFIX] * len(r.prefix)
                            + [r.kind] * len(r.completion.token_ids)
                            for r in s.rows], PROMPT, width)                                              # [B, T]
        attention = pad_right([[1] * (len(r.prompt.ids) + len(r.prefix) + len(r.completion.token_ids)) for r in s.rows],
                              0, width)                                                                   # [B, T]
        loss_mask = ((source != PROMPT) & attention.bool()).long() * torch.tensor(live, dtype=torch.long)[:, None]
        sampler = torch.zeros(len(s.rows), width - 1)                                                      # [B, L]
        for i, r in enumerate(s.rows):
            start = len(r.prompt.ids) - 1                                 # position predicting the first response token
            sampler[i, start : start + len(r.prefix)] = math.nan
            sampler[i, start + len(r.prefix) : start + len(r.prefix) + len(r.completion.token_ids)] = torch.tensor(
                r.completion.logprobs, dtype=torch.float32)
        return Experience(input_ids=input_ids, attention_mask=attention, loss_mask=loss_mask, source=source * attention,
                          group=s.group, sampler_logprobs=sampler, rewards=s.rewards,
                          columns=[r.prompt.columns for r in s.rows])

    def teacher_force(self, exp: Experience, policy: torch.nn.Module, ref: torch.nn.Module | None) -> Tensor | None:
        """pi_old (only when needed), V_old (PPO), pi_ref (only with a KL term), all at the sampling temperature; and
        the policy's entropies [B, L] when Prefix-RFT masks prefix tokens by entropy (returned)."""
        entropy = self.plan.prefixes is not None and bool(exp.source.eq(PREFIX).any())
        entropies = None
        if self.reuses_batch or self.plan.kl_beta > 0 or self.plan.values or entropy:
            old, values, entropies = self.scored(policy, exp, entropy=entropy)
            if self.reuses_batch or self.plan.kl_beta > 0 or self.plan.values:
                exp.old_logprobs, exp.values = old, values
        if self.plan.reference:
            if ref is None:
                raise RuntimeError("the objective has a KL term but the trainer built no reference model")
            exp.ref_logprobs, _, _ = self.scored(ref, exp)
        return entropies

    @torch.no_grad()
    def scored(self, model: torch.nn.Module, exp: Experience,
               entropy: bool = False) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """Teacher-forced log-probs [B, L] (values [B, L] if the model has a value head; entropies [B, L] if asked),
        in micro-batches."""
        logps, values, ents = torch.zeros(exp.targets.shape), None, torch.zeros(exp.targets.shape) if entropy else None
        for start in range(0, len(exp), self.micro):
            mb = exp.select(slice(start, start + self.micro)).trimmed().to(self.acc.device)
            with self.acc.autocast():
                out = forward(model, mb, self.temperature, entropy=entropy, layout=self.layout)
            rows, width = slice(start, start + len(mb)), out.logprobs.shape[1]
            logps[rows, :width] = out.logprobs.float().cpu()
            if out.values is not None:
                values = torch.zeros(exp.targets.shape) if values is None else values
                values[rows, :width] = out.values.float().cpu()
            if entropy:
                ents[rows, :width] = out.entropy.float().cpu()
        return logps, values, ents

    def advantages(self, exp: Experience, entropies: Tensor | None) -> None:
        """A [B, L] (and returns for PPO) from R, with the KL penalty in the reward when the objective puts it there;
        then Prefix-RFT's entropy mask."""
        p, mask = self.plan, exp.target_mask                                             # [B, L] loss tokens
        rewards: Tensor = exp.rewards                                                    # [B] R
        if p.kl_beta > 0 or p.estimator == "gae":
            completion = ((exp.source[:, 1:] == POLICY) & exp.attention_mask[:, 1:].bool()).float()   # [B, L]
            per_token = token_rewards(exp.rewards, completion, exp.old_logprobs, exp.ref_logprobs, p.kl_beta,
                                      p.kl_estimator)                                    # [B, L] r_t
            rewards = per_token if p.estimator == "gae" else per_token.sum(-1)            # [B, L] or [B]
        exp.advantages, exp.returns = compute_advantages(
            p.estimator, p.params, AdvantageInputs(rewards, mask, exp.group, exp.values, reduce=self.acc))
        if entropies is not None:
            self.mask_prefix_entropy(exp, entropies)

    def mask_prefix_entropy(self, exp: Experience, entropies: Tensor) -> None:
        """A = 0 on the floor(rho N) lowest-entropy prefix tokens of the whole rollout batch (all processes; ties in
        global row order), so the choice is the same for any micro-batching and number of processes. The authors'
        code picks them per micro-batch from the current forward; with one update per batch the entropies are the
        same, only the population of the quantile differs (docs/provenance.md)."""
        rho = schedule_value(self.plan.prefixes.entropy_mask, self.step)
        on = (exp.source[:, 1:] == PREFIX) & (exp.target_mask > 0)                       # [B, L] prefix loss tokens
        local = entropies[on]                                                            # [n_p] row-major order
        counts = self.gather(torch.tensor([local.numel()], dtype=torch.long))            # [W]
        width = int(counts.max())
        padded = torch.full((width,), math.inf, dtype=torch.float64)
        padded[: local.numel()] = local.double()
        every = self.gather(padded)                                                       # [W * width]
        values = torch.cat([every[i * width : i * width + int(n)] for i, n in enumerate(counts.tolist())])
        chosen = lowest_fraction(values, rho) if values.numel() else torch.zeros(0, dtype=torch.bool)
        offset = int(counts[: self.rank].sum())
        drop = torch.zeros_like(on)
        drop[on] = chosen[offset : offset + local.numel()]
        exp.advantages = exp.advantages.masked_fill(drop, 0.0)
        self.log.extra |= {"prefix/entropy_masked": float(chosen.sum()) / max(values.numel(), 1), "prefix/rho": rho}

    # ---------------------------------------------------------------------------------------------- metrics
    def record(self, s: Samples, scored: RewardBatch) -> None:
        """Gather one round's rewards, lengths and group statistics over processes (equal sizes every round). Reward
        and length statistics describe the policy's rows; demonstration rows are logged as reward/demo_mean."""
        log = self.log
        policy = torch.tensor([r.kind == POLICY for r in s.rows])                          # [B]
        total = torch.tensor(scored.total, dtype=torch.float64)
        log.totals += self.gather(total[policy]).tolist()
        log.demo_rewards += self.gather(total[~policy]).tolist()
        for label, vals in scored.values.items():
            v = torch.tensor([math.nan if x is None else x for x in vals], dtype=torch.float64)[policy]
            log.values.setdefault(label, []).extend(None if math.isnan(x) else x for x in self.gather(v).tolist())
        labels = sorted(scored.values)
        errors = self.reduce(torch.tensor([float(sum(e.reward == k for e in scored.errors)) for k in labels]), "sum")
        seconds = self.reduce(torch.tensor([scored.seconds.get(k, 0.0) for k in labels]), "max")
        for k, e, sec in zip(labels, errors.tolist(), seconds.tolist()):
            log.errors[k], log.seconds[k] = log.errors.get(k, 0.0) + e, log.seconds.get(k, 0.0) + sec
        rows = [r for r in s.rows if r.kind == POLICY]
        lengths = torch.tensor([len(r.completion.token_ids) + (len(r.prefix) if r.prefix_is_response else 0)
                                for r in rows])
        clipped = torch.tensor([r.completion.finish_reason == "length" for r in rows], dtype=torch.float64)
        log.lengths += self.gather(lengths).tolist()
        n_groups = len(torch.unique(s.group))
        zero = n_groups - len(torch.unique(s.group[informative(s.group, s.rewards)]))
        counts = self.reduce(torch.tensor([clipped.sum().item(), float(n_groups), float(zero)]), "sum")
        log.clipped, log.groups, log.zero_std_groups = (log.clipped + int(counts[0]), log.groups + int(counts[1]),
                                                        log.zero_std_groups + int(counts[2]))

    def provenance_metrics(self, exp: Experience) -> dict[str, float]:
        """Fractions of the batch's loss tokens that are demonstration / prefix tokens, and the guidance draws."""
        on = exp.loss_mask.bool()
        kinds = torch.stack([(exp.source.eq(k) & on).sum() for k in (DEMO, PREFIX)] + [on.sum()]).double()
        demo, prefix, total = self.reduce(kinds, "sum").tolist()
        out = {}
        if self.plan.demos_in_group:
            out["tokens/demo_frac"] = demo / max(total, 1.0)
        if self.plan.prefixes or self.plan.hints:
            out["tokens/prefix_frac"] = prefix / max(total, 1.0)
        for key in ("prefix/ratio", "hint/fraction"):
            if key in self.log.extra:                                        # per-row draws -> their global mean
                draws = self.log.extra.pop(key)
                sums = self.reduce(torch.tensor([sum(draws), float(len(draws))], dtype=torch.float64), "sum")
                out[key] = float(sums[0] / sums[1].clamp(min=1))
        if self.plan.prefixes:
            out["prefix/low"], out["prefix/high"] = self.plan.prefixes.bounds(self.step)
        if self.plan.hints:
            out["hint/probability"] = schedule_value(self.plan.hints.probability, self.step)
        return out

    def metrics(self) -> dict[str, float]:
        """The step's metrics, exact over all processes and over every policy row sampled in the step (every round
        of dynamic sampling, kept or not): reward/mean, reward/std and reward/<fn>/{mean,std,abstained,errors,
        seconds} (rewarding.reward_metrics), reward/demo_mean (demonstration rows), frac_reward_zero_std (groups),
        completion/{mean,min,max}_length and completion/clipped_ratio (cut at max_new_tokens),
        sampling/{rounds,dropped_groups,padded_groups} (dynamic sampling), tokens/{demo,prefix}_frac,
        prefix/{ratio,low,high,rho,entropy_masked}, hint/{fraction,probability} (guidance),
        time/{generate,reward,logprobs} (the slowest process), epoch (prompts drawn / data set size)."""
        log = self.log
        batch = RewardBatch(log.totals, log.values, [], log.seconds)
        out = reward_metrics(batch) | {f"reward/{k}/errors": v for k, v in log.errors.items()}
        if log.demo_rewards:
            out["reward/demo_mean"] = sum(log.demo_rewards) / len(log.demo_rewards)
        n = max(len(log.lengths), 1)
        out |= {"frac_reward_zero_std": log.zero_std_groups / max(log.groups, 1),
                "completion/mean_length": sum(log.lengths) / n,
                "completion/min_length": float(min(log.lengths, default=0)),
                "completion/max_length": float(max(log.lengths, default=0)),
                "completion/clipped_ratio": log.clipped / n}
        times = self.reduce(torch.tensor([log.time.get(k, 0.0) for k in ("generate", "reward", "logprobs")]), "max")
        out |= {f"time/{k}": float(v) for k, v in zip(("generate", "reward", "logprobs"), times)}
        return out | log.extra | {"epoch": self.cursor / len(self.prompts)}

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


def check_demonstrations(prompts: list[Prompt], plan: RolloutPlan, cfg: RolloutConfig, where: str, source: str,
                         column: str) -> None:
    """Every prompt has the demonstration the plan reads, and a demonstration placed in a group fits the rollout
    budget; the error names the stage's data and the column."""
    for i, p in enumerate(prompts):
        if p.demo is None or not p.demo_ids:
            raise ConfigError(f"{source}: {where}.columns.completion: the objective puts demonstrations into its "
                              "rollouts "
                              f"but prompt {i} has none; map the role 'completion' (now {column!r}) to a column "
                              "holding the demonstrations")
        if plan.demos_in_group and len(p.demo_ids) > cfg.sampling.max_new_tokens:
            raise ConfigError(f"{source}: {where}: the demonstration of prompt {i} ({column!r}) is {len(p.demo_ids)} "
                              f"tokens, longer than the rollout budget rollout.sampling.max_new_tokens = "
                              f"{cfg.sampling.max_new_tokens}; raise the budget or drop long rows (data.limit, "
                              "shorter demonstrations)")


def _seed(*parts: int) -> int:
    """A sampling seed derived from integers (stable across runs, platforms and process counts)."""
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "big") % 2**63
