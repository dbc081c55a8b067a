"""The training loop: stages of weighted objectives over experience, on accelerate. Read top to bottom.

    for stage in recipe.stages:
        objectives, builder, optimizer, schedule  <- the stage's config
        for step in stage:
            demonstrations:  optimize(this process's share of global batch `step`)
            rollouts:        batch = RolloutBuilder.collect()   (generate, reward, advantages; rl/builder.py)
                             for pass in num_iterations: for mini in batch: optimize(mini); engine.sync_weights
            log, evaluate, checkpoint

    optimize(batch):
        norm = global token / sequence counts of the whole batch (all micro-batches, all processes)
        for micro in batch:  loss = sum_k w_k * aggregate_k(objective_k(policy(micro)), norm); backward
        clip, optimizer.step, scheduler.step

Metrics: objective metrics are token means (weighted by each micro-batch's share of the step's tokens, so their sum
is the exact global mean), except names ending in /min or /max, reduced by min / max. In an RL stage the policy
objective's metrics keep their own names (kl, entropy, clip_ratio/low, ...); elsewhere they are `<objective>/<name>`.
"""
from __future__ import annotations

import contextlib
import functools
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from posttrain import checkpoint as ckpt
from posttrain.config import Recipe, StageConfig
from posttrain.configlib import ConfigError
from posttrain.data import EpochSampler, Tokenized, collate_demos, load_rows, to_examples, tokenize_demos
from posttrain.evaluation import greedy_verdicts, held_out_examples
from posttrain.experience import Experience
from posttrain.metrics import MetricsLog, Progress
from posttrain.models import (AdapterDisabledReference, frozen_copy, load_model, load_tokenizer,
                              resolve_model_path, save_merged)
from posttrain.objectives import Normalizer, aggregate, build_objective
from posttrain.policy import forward
from posttrain.rewarding import load_rewards
from posttrain.rl.builder import RLPlan, RolloutBuilder, check_world, rollout_prompts
from posttrain.rl.value_head import ValueHeadModel
from posttrain.rollout import ENGINES

METRIC_NAMES = {"pg_loss": "loss/policy", "vf_loss": "loss/value"}   # objective metric -> the name users know


def reduction(name: str) -> str:
    """How a metric combines over micro-batches, processes and updates: min, max, or (token-weighted) sum / mean."""
    return "min" if name.endswith("/min") else "max" if name.endswith("/max") else "sum"


def make_accelerator(recipe: Recipe, mixed_precision: str = "no"):
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs

    # Several CPU processes talk over gloo (DeepSpeed through accelerate needs it named explicitly).
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    handlers = [InitProcessGroupKwargs(backend="gloo")] if distributed and not torch.cuda.is_available() else []
    return Accelerator(log_with=list(recipe.logging.report_to) or None, project_dir=recipe.output_dir,
                       mixed_precision=mixed_precision, kwargs_handlers=handlers)


class DemoBuilder:
    """Demonstration batches: global batch `step` of a seeded per-epoch order, this process's contiguous share."""

    def __init__(self, items: list[Tokenized], pad_id: int, seed: int, batch_size: int, rank: int, world: int):
        self.items, self.pad_id, self.batch_size = items, pad_id, batch_size
        self.rank, self.world = rank, world
        self.sampler = EpochSampler(len(items), seed)

    def batch(self, step: int) -> Experience:
        per_rank = self.batch_size // self.world
        idx = self.sampler.indices(step * self.batch_size + self.rank * per_rank, per_rank)
        return collate_demos([self.items[i] for i in idx], self.pad_id)


@dataclass
class StageRun:
    """Everything built for one stage."""

    cfg: StageConfig
    objectives: dict            # name -> objective
    weights: dict[str, float]
    builder: DemoBuilder | RolloutBuilder
    total_steps: int            # stage steps: optimizer steps, or rollout batches in an RL stage
    optimizer: torch.optim.Optimizer
    scheduler: object
    ref: torch.nn.Module | None
    data_stats: dict
    temperature: float = 1.0    # policy log-probs are log softmax(z / T): the rollout's sampling temperature

    @functools.cached_property
    def needs(self) -> frozenset[str]:
        """What the stage's objectives need from the trainer (the union of their `needs`)."""
        return frozenset().union(*(o.needs for o in self.objectives.values()))

    @property
    def rollout(self) -> RolloutBuilder | None:
        return self.builder if isinstance(self.builder, RolloutBuilder) else None


class Trainer:
    def __init__(self, recipe: Recipe, resume: str | None = None):
        self.recipe = recipe
        self.run_dir = Path(recipe.output_dir)
        self.accelerator = make_accelerator(recipe, {"fp32": "no"}.get(recipe.model.precision, recipe.model.precision))
        acc = self.accelerator
        self.run_dir.mkdir(parents=True, exist_ok=True)
        from accelerate.utils import set_seed

        set_seed(recipe.seed)
        with acc.main_process_first():
            path = resolve_model_path(recipe.model, self.run_dir.parent / ".posttrain-cache")
        self.tokenizer = load_tokenizer(path, recipe.model, recipe.data_sections())
        self.model = load_model(path, recipe.model)
        self.model.train()
        self.log = MetricsLog(acc, self.run_dir)
        self.rewards = {i: load_rewards(st.rewards, f"stages.{i}.rewards", recipe.source)   # resolved before training
                        for i, st in enumerate(recipe.stages) if st.rewards}
        self.resume_from = ckpt.resolve(self.run_dir, resume) if resume else None
        self.state = ckpt.read_state(self.resume_from) if self.resume_from else ckpt.RunState()
        if recipe.logging.report_to:
            acc.init_trackers(recipe.logging.project)

    # ----------------------------------------------------------------------------------------------- run
    def run(self) -> dict:
        results: dict = {}
        for index, stage in enumerate(self.recipe.stages):
            if index < self.state.stage:
                continue
            if index > self.state.stage:
                self.state = ckpt.RunState(stage=index, global_step=self.state.global_step)
            results = self.run_stage(index, stage)
        self.export_final()
        if getattr(self.accelerator, "deepspeed_engine_wrapped", None) is not None:
            self.accelerator.free_memory()   # destroy the DeepSpeed engine before its process group goes
        self.accelerator.end_training()
        return results

    def run_stage(self, index: int, stage: StageConfig) -> dict:
        acc = self.accelerator
        self.state.stage, self.state.stage_name = index, stage.name
        run = self.setup_stage(stage)
        if self.resume_from is not None:
            acc.load_state(str(self.resume_from))
            run.scheduler.load_state_dict(self.state.scheduler)
            self.resume_from = None
        self.log.log({"stage": index, "world_size": acc.num_processes,
                      **{f"data/{k}": v for k, v in run.data_stats.items()}}, self.state.global_step)
        bar = Progress(acc.is_main_process and self.recipe.logging.progress_bar, run.total_steps, self.state.step,
                       f"{stage.name}")
        metrics: dict = {}
        started, rewards = time.perf_counter(), []
        try:
            while self.state.step < run.total_steps:
                metrics = self.train_step(run)
                if "reward/mean" in metrics:
                    rewards.append(metrics["reward/mean"])
                self.state.step += 1
                self.state.global_step += 1
                last = self.state.step == run.total_steps or self.out_of_time(stage, started)
                metrics |= self.maybe_evaluate(run, final=last)
                if self.state.step % stage.train.log_every == 0 or last or "eval/accuracy" in metrics:
                    self.log.log({"stage": index, **metrics}, self.state.global_step)
                self.maybe_save(run, final=last)
                bar.update(metrics)
                if last:
                    break
        finally:
            if run.rollout is not None:
                run.rollout.close()
        bar.close()
        if rewards and acc.is_main_process:
            print(reward_summary(stage.name, rewards, metrics.get("eval/accuracy")), flush=True)
        return metrics

    def out_of_time(self, stage: StageConfig, started: float) -> bool:
        """Whether the stage's `train.max_minutes` is spent; every process gets the slowest process's answer."""
        if stage.train.max_minutes is None:
            return False
        spent = torch.tensor(time.perf_counter() - started, device=self.accelerator.device)
        return bool(self.accelerator.reduce(spent, "max") > 60.0 * stage.train.max_minutes)

    # --------------------------------------------------------------------------------------------- setup
    def setup_stage(self, stage: StageConfig) -> StageRun:
        acc = self.accelerator
        objectives = {name: build_objective(self.recipe.objectives[name]) for name in stage.objectives}
        needs = set().union(*(o.needs for o in objectives.values()))
        if "rollouts" not in needs:
            builder, total, stats = self.demo_builder(stage)
        unwrapped = acc.unwrap_model(self.model)
        backbone = unwrapped.model if isinstance(unwrapped, ValueHeadModel) else unwrapped
        ref = self.reference(backbone) if needs & {"reference", "ref_logits"} else None
        if "values" in needs:      # PPO: a value head on the backbone, for this stage only (no gradient elsewhere)
            policy = unwrapped if isinstance(unwrapped, ValueHeadModel) else self.value_head_model(backbone)
        else:
            policy = backbone
        acc.free_memory()
        optimizer = make_optimizer(policy, stage)
        self.configure_deepspeed(stage)
        self.model, optimizer = acc.prepare(policy, optimizer)
        updates = 1
        if "rollouts" in needs:    # the engine samples from the prepared policy
            builder, total, stats = self.rollout_builder(stage, objectives)
            updates = stage.rollout.updates_per_step
        scheduler = make_scheduler(optimizer, stage, total * updates)   # the schedule counts optimizer steps
        temperature = (stage.rollout.sampling.temperature or 1.0) if "rollouts" in needs else 1.0
        return StageRun(stage, objectives, dict(stage.objectives), builder, total, optimizer, scheduler, ref, stats,
                        temperature)

    def value_head_model(self, backbone: torch.nn.Module) -> ValueHeadModel:
        """The backbone with a fresh value head, initialised from the recipe seed and the stage alone (the same on
        every process and under any launcher; the global RNG stream is left as it was)."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.recipe.seed + self.state.stage)
            return ValueHeadModel(backbone)

    def demo_builder(self, stage: StageConfig) -> tuple[DemoBuilder, int, dict]:
        acc, where = self.accelerator, f"stages.{self.state.stage}.data"
        rows, columns = load_rows(stage.data, where)
        items, stats = tokenize_demos(to_examples(rows, columns, stage.data, where), self.tokenizer, stage.data, where)
        world = acc.num_processes
        if stage.train.batch_size % world:
            raise ValueError(f"{self.recipe.source}: stages.{self.state.stage}.train.batch_size "
                             f"({stage.train.batch_size}) must be a multiple of the number of processes ({world})")
        total = stage.train.steps or max(1, math.ceil(stage.train.epochs * len(items) / stage.train.batch_size))
        builder = DemoBuilder(items, self.tokenizer.pad_token_id, self.recipe.seed + self.state.stage,
                              stage.train.batch_size, acc.process_index, world)
        return builder, total, {"examples": stats.kept, "truncated": stats.truncated,
                                "dropped_overlong": stats.dropped_overlong}

    def rollout_builder(self, stage: StageConfig, objectives: dict) -> tuple[RolloutBuilder, int, dict]:
        acc, index, where = self.accelerator, self.state.stage, f"stages.{self.state.stage}"
        check_world(stage.rollout, acc.num_processes, f"{where}.rollout", self.recipe.source)
        rows, columns = load_rows(stage.data, f"{where}.data")
        examples = to_examples(rows, columns, stage.data, f"{where}.data")
        prompts, dropped = rollout_prompts(examples, rows, columns, self.tokenizer, stage.data.max_length, stage.data)
        if not prompts:
            raise ConfigError(f"{self.recipe.source}: {where}.data: every prompt of {stage.data.source!r} is longer "
                              f"than max_length={stage.data.max_length} tokens")
        (objective,) = objectives.values()
        engine = ENGINES.get(stage.rollout.engine)(self.model, self.tokenizer, stage.rollout.engine_args, acc)
        builder = RolloutBuilder(prompts, stage.rollout, RLPlan.of(objective), self.rewards[index], engine,
                                 self.tokenizer, acc, self.recipe.seed + index, stage.train.micro_batch_size)
        builder.load_state_dict(self.state.extras.get("rollout", {}))
        per_step = stage.rollout.prompts_per_step
        total = stage.train.steps or max(1, math.ceil(stage.train.epochs * len(prompts) / per_step))
        return builder, total, {"prompts": len(prompts), "dropped_overlong": dropped}

    def reference(self, backbone: torch.nn.Module) -> torch.nn.Module:
        """pi_ref = the policy at the start of the stage, frozen. After the first stage that is no longer the loaded
        model, so it is saved once under RUN_DIR/references/stage<i> and read back when a run resumes in the stage
        (from the checkpoint's run directory; copied into this run's if they differ)."""
        acc, index = self.accelerator, self.state.stage
        if self.recipe.model.lora is not None:               # the base model: the adapters disabled, no copy
            return AdapterDisabledReference(backbone)
        path = self.run_dir / "references" / f"stage{index}"
        if index > 0 and self.resume_from is not None:
            saved = Path(self.resume_from).resolve().parent.parent / "references" / f"stage{index}"
            if not (saved / "config.json").is_file():
                raise FileNotFoundError(f"resuming stage {index} needs its reference model, saved at {saved} when "
                                        "the stage started; it is missing")
            if acc.is_main_process and saved != path.resolve():
                shutil.copytree(saved, path, dirs_exist_ok=True)
            acc.wait_for_everyone()
            return load_model(str(saved), self.recipe.model).eval().requires_grad_(False).to(acc.device)
        ref = self.frozen_reference(backbone)
        if index > 0:
            if acc.is_main_process:
                ref.save_pretrained(path)
            acc.wait_for_everyone()
        return ref

    def frozen_reference(self, backbone: torch.nn.Module) -> torch.nn.Module:
        """A frozen full copy of the policy on every process; under ZeRO-3 gathered from its shards (the copy is not
        sharded: each process holds the whole reference)."""
        if not any(hasattr(p, "ds_id") for p in backbone.parameters()):
            return frozen_copy(backbone).to(self.accelerator.device)
        import deepspeed
        from transformers import AutoModelForCausalLM
        from transformers.integrations import unset_hf_deepspeed_config

        with deepspeed.zero.GatheredParameters(list(backbone.parameters())):
            state = {k: v.detach().clone() for k, v in backbone.state_dict().items()}
        unset_hf_deepspeed_config()              # else transformers builds the copy partitioned (zero.Init) again
        try:
            ref = AutoModelForCausalLM.from_config(backbone.config, dtype=next(iter(state.values())).dtype)
        finally:
            self.accelerator.state.deepspeed_plugin.set_deepspeed_weakref()
        ref.load_state_dict(state)
        return ref.eval().requires_grad_(False).to(self.accelerator.device)

    def configure_deepspeed(self, stage: StageConfig) -> None:
        """Under DeepSpeed: micro-batch size and gradient clipping from the stage, one accumulation step in its config
        (the trainer accumulates micro-batches itself and marks the last one; see `backward`)."""
        plugin = self.accelerator.state.deepspeed_plugin
        if plugin is None:
            return
        micro = stage.train.micro_batch_size
        plugin.deepspeed_config.update({"train_micro_batch_size_per_gpu": micro, "gradient_accumulation_steps": 1,
                                        "train_batch_size": micro * self.accelerator.num_processes,
                                        "gradient_clipping": stage.optim.max_grad_norm})

    # ---------------------------------------------------------------------------------------------- step
    def train_step(self, run: StageRun) -> dict:
        if run.rollout is not None:
            return self.rollout_step(run)
        acc, started = self.accelerator, time.perf_counter()
        batch = run.builder.batch(self.state.step)
        metrics = self.optimize(run, batch)
        tokens = acc.reduce(batch.attention_mask.sum().to(acc.device), "sum")
        return metrics | {"tokens_per_s": float(tokens) / (time.perf_counter() - started),
                          "epoch": (self.state.step + 1) * run.cfg.train.batch_size / len(run.builder.items)}

    def rollout_step(self, run: StageRun) -> dict:
        """One rollout batch, then num_iterations passes over its mini-batches (one optimizer step each)."""
        acc, rollout, started = self.accelerator, run.rollout, time.perf_counter()
        batch, metrics = rollout.collect(acc.unwrap_model(self.model), run.ref)
        trained, synced, updates = time.perf_counter(), 0.0, []
        for _ in range(run.cfg.rollout.num_iterations):
            for mini in rollout.mini_batches(batch):
                updates.append(self.optimize(run, mini, max_len=run.cfg.rollout.sampling.max_new_tokens))
                tick = time.perf_counter()
                rollout.engine.sync_weights(self.model)
                synced += time.perf_counter() - tick
        done = time.perf_counter()
        tokens = float(acc.reduce(batch.attention_mask.sum().to(acc.device), "sum"))
        return metrics | combine_updates(updates) | {
            "time/train": done - trained - synced, "time/sync": synced, "time/step": done - started,
            "tokens_per_s": tokens / (done - started), "optimizer_steps": float(len(updates))}

    def optimize(self, run: StageRun, batch: Experience, max_len: float | None = None) -> dict:
        """One optimizer step on this process's share of a global batch -> metrics reduced over processes."""
        acc = self.accelerator
        norm = self.global_normalizer(batch, max_len)
        micro = batch.split(run.cfg.train.micro_batch_size)
        totals: dict[str, torch.Tensor] = {}
        for i, mb in enumerate(micro):
            sync = contextlib.nullcontext() if i == len(micro) - 1 else acc.no_sync(self.model)
            with sync, acc.autocast():
                loss, parts = self.micro_loss(run, mb.trimmed().to(acc.device), norm)
                self.backward(loss * acc.num_processes, last=i == len(micro) - 1)  # DDP/ZeRO average over processes
            for k, v in parts.items():
                totals[k] = v if k not in totals else _combine(reduction(k), totals[k], v)
        grad_norm = self.clip(run)
        run.optimizer.step()
        run.scheduler.step()
        run.optimizer.zero_grad(set_to_none=True)
        return self.reduce_metrics(totals) | {"lr": run.scheduler.get_last_lr()[0], "grad_norm": grad_norm}

    def micro_loss(self, run: StageRun, mb: Experience, norm: Normalizer) -> tuple[torch.Tensor, dict]:
        """sum_k w_k * aggregate_k(loss_k) on one micro-batch, plus detached per-objective parts."""
        if run.ref is not None and run.rollout is None:   # rollouts carry ref_logprobs from collection
            with torch.no_grad():
                ref_out = forward(run.ref, mb, logprobs="reference" in run.needs, logits="ref_logits" in run.needs)
            mb.ref_logprobs = ref_out.logprobs
            mb.ref_logits = ref_out.logits
        out = forward(self.model, mb, run.temperature, logits="logits" in run.needs, entropy="entropy" in run.needs)
        mask = mb.target_mask                                            # [B, L]
        share = mask.sum() / max(norm.tokens, 1.0)                       # this micro-batch's share of the tokens
        total, parts = 0.0, {}
        for name, objective in run.objectives.items():
            per_token, metrics = objective(out, mb)                      # [B, L]
            agg = aggregate(per_token, mask, objective.config.aggregation, norm)
            total = total + run.weights[name] * agg
            parts[f"loss/{name}"] = agg.detach()
            prefix = "" if "rollouts" in objective.needs else f"{name}/"
            for k, v in metrics.items():  # token means: weighted by the share (their sum is the global mean)
                key = prefix + METRIC_NAMES.get(k, k)
                v = torch.as_tensor(v, dtype=torch.float32)
                parts[key] = v * share if reduction(key) == "sum" else v
        parts["loss"] = total.detach()
        return total, parts

    def global_normalizer(self, batch: Experience, max_len: float | None = None) -> Normalizer:
        """Token and sequence counts of the whole batch over all processes; L_max = `max_len` (the generation budget
        of a rollout) or the longest loss span."""
        mask = batch.target_mask
        counts = torch.tensor([mask.sum(), (mask.sum(-1) > 0).sum()], dtype=torch.float64, device=self.accelerator.device)
        counts = self.accelerator.reduce(counts, "sum")
        if max_len is None:
            max_len = self.accelerator.reduce(mask.sum(-1).max().to(self.accelerator.device, torch.float64), "max")
        return Normalizer(tokens=float(counts[0]), seqs=float(counts[1]), max_len=float(max_len))

    def backward(self, loss: torch.Tensor, last: bool) -> None:
        """accelerate's backward, except under DeepSpeed: its engine scales by 1 / its accumulation steps and steps
        the optimizer inside every backward, so the trainer tells it which micro-batch ends the optimizer step (the
        engine then clips, steps and zeroes the gradients; optimizer.step / zero_grad are no-ops there)."""
        engine = getattr(self.accelerator, "deepspeed_engine_wrapped", None)
        if engine is None:
            self.accelerator.backward(loss)
        else:
            engine.backward(loss, sync_gradients=last)

    def clip(self, run: StageRun) -> float:
        engine = getattr(self.accelerator, "deepspeed_engine_wrapped", None)
        if engine is not None:                                        # DeepSpeed clipped in its step (its config)
            norm = engine.get_global_grad_norm()
            return float(norm) if norm is not None else math.nan
        max_norm = run.cfg.optim.max_grad_norm
        params = [p for p in self.model.parameters() if p.grad is not None]
        if max_norm > 0:
            return float(self.accelerator.clip_grad_norm_(params, max_norm))
        return float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params]))) if params else 0.0

    def reduce_metrics(self, totals: dict[str, torch.Tensor]) -> dict[str, float]:
        """Sum (token-weighted means), min or max over processes, by each metric's name."""
        acc, out = self.accelerator, {}
        for kind in ("sum", "min", "max"):
            names = sorted(k for k in totals if reduction(k) == kind)
            if not names:
                continue
            values = torch.stack([torch.as_tensor(totals[k], dtype=torch.float32) for k in names]).to(acc.device)
            if kind == "sum":
                values = acc.reduce(values, "sum")
            elif acc.num_processes > 1:
                gathered = acc.gather(values[None])                     # [W, K]
                values = gathered.amin(0) if kind == "min" else gathered.amax(0)
            out |= {k: float(v) for k, v in zip(names, values)}
        return out

    # ---------------------------------------------------------------------------------- eval, checkpoints
    def maybe_evaluate(self, run: StageRun, final: bool) -> dict:
        every = run.cfg.train.eval_every
        if run.cfg.eval.data is None or not (final or (every and self.state.step % every == 0)):
            return {}
        return self.evaluate(run.cfg)

    def evaluate(self, stage: StageConfig) -> dict:
        """Greedy accuracy on the stage's held-out data, each process scoring its share."""
        acc, cfg = self.accelerator, stage.eval
        examples = held_out_examples(cfg, f"stages.{self.state.stage}.eval.data")
        _, correct = greedy_verdicts(self.model, self.tokenizer, cfg, examples[acc.process_index :: acc.num_processes],
                                     acc)
        counts = acc.reduce(torch.tensor([sum(correct), len(correct)], dtype=torch.float64, device=acc.device), "sum")
        return {"eval/accuracy": float(counts[0] / counts[1]), "eval/num_samples": int(counts[1])}

    def maybe_save(self, run: StageRun, final: bool) -> None:
        every = run.cfg.train.save_every
        if final or (every and self.state.step % every == 0):
            self.state.scheduler = run.scheduler.state_dict()
            if run.rollout is not None:
                self.state.extras["rollout"] = run.rollout.state_dict()
            ckpt.save(self.accelerator, self.run_dir, self.state, run.cfg.train.keep_checkpoints)

    def export_final(self) -> Path:
        """The trained policy in plain transformers format: RUN_DIR/final."""
        out = self.run_dir / "final"
        acc = self.accelerator
        acc.wait_for_everyone()
        state = acc.get_state_dict(self.model)
        if acc.is_main_process:
            acc.unwrap_model(self.model).save_pretrained(out, state_dict=state)   # with LoRA: the adapter
            self.tokenizer.save_pretrained(out)
        if self.recipe.model.lora is not None and self.recipe.model.lora.merge:
            save_merged(acc.unwrap_model(self.model), out / "merged", self.tokenizer, acc.is_main_process)
        acc.wait_for_everyone()
        return out


def combine_updates(updates: list[dict]) -> dict:
    """The metrics of one rollout step's optimizer updates: min / max for /min and /max names, the last lr, else the
    mean."""
    out = {}
    for k in updates[0]:
        values = [u[k] for u in updates]
        kind = reduction(k)
        out[k] = values[-1] if k == "lr" else min(values) if kind == "min" else max(values) if kind == "max" \
            else sum(values) / len(values)
    return out


def _combine(kind: str, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return a + b if kind == "sum" else torch.minimum(a, b) if kind == "min" else torch.maximum(a, b)


def make_optimizer(model: torch.nn.Module, stage: StageConfig) -> torch.optim.Optimizer:
    """AdamW; no weight decay on biases and norm weights (1-D parameters)."""
    o = stage.optim
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": o.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=o.lr, betas=o.betas, eps=o.eps)


def make_scheduler(optimizer, stage: StageConfig, total_steps: int):
    from transformers import get_scheduler

    s = stage.schedule
    warmup = s.warmup_steps if s.warmup_steps is not None else int(s.warmup_ratio * total_steps)
    name, extra = {"cosine": ("cosine_with_min_lr", {"min_lr_rate": s.min_lr_ratio}),
                   "linear": ("linear", {}), "constant": ("constant_with_warmup", {})}[s.name]
    return get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=total_steps,
                         scheduler_specific_kwargs=extra)


def reward_summary(stage: str, rewards: list[float], accuracy: float | None) -> str:
    """One line at the end of an RL stage: the mean reward of its first and last tenth of steps.

    >>> reward_summary("grpo", [0.1, 0.2, 0.3, 0.5], 0.75)
    'stage grpo: reward/mean 0.100 (first 1 steps) -> 0.500 (last 1 steps) over 4 steps; eval/accuracy 0.750'
    """
    k = max(1, len(rewards) // 10)
    line = (f"stage {stage}: reward/mean {sum(rewards[:k]) / k:.3f} (first {k} steps) -> "
            f"{sum(rewards[-k:]) / k:.3f} (last {k} steps) over {len(rewards)} steps")
    return line + (f"; eval/accuracy {accuracy:.3f}" if accuracy is not None else "")


def train(recipe: Recipe, resume: str | None = None) -> dict:
    return Trainer(recipe, resume).run()
