"""The training loop: stages of weighted objectives over experience, on accelerate. Read top to bottom.

    for stage in recipe.stages:
        objectives, builders, optimizer, schedule  <- the stage's config
        for step in stage:
            batch  = this process's share of the global batch (deterministic in `step`)
            norm   = global token / sequence counts of the whole step (all micro-batches, all processes)
            for micro in batch:  loss = sum_k w_k * aggregate_k(objective_k(policy(micro)), norm); backward
            clip, optimizer.step, scheduler.step
            log, evaluate, checkpoint
"""
from __future__ import annotations

import contextlib
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from posttrain import checkpoint as ckpt
from posttrain.config import Recipe, StageConfig
from posttrain.data import EpochSampler, Tokenized, collate_demos, load_rows, to_examples, tokenize_demos
from posttrain.evaluation import greedy_completions, score
from posttrain.experience import Experience
from posttrain.metrics import MetricsLog, Progress
from posttrain.models import frozen_copy, load_model, load_tokenizer, resolve_model_path
from posttrain.objectives import Normalizer, aggregate, build_objective
from posttrain.policy import forward


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
    builder: DemoBuilder
    total_steps: int
    optimizer: torch.optim.Optimizer
    scheduler: object
    ref: torch.nn.Module | None
    data_stats: dict


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
        self.tokenizer = load_tokenizer(path, recipe.model)
        self.model = load_model(path, recipe.model)
        self.model.train()
        self.log = MetricsLog(acc, self.run_dir)
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
        while self.state.step < run.total_steps:
            metrics = self.train_step(run)
            self.state.step += 1
            self.state.global_step += 1
            metrics |= self.maybe_evaluate(run, final=self.state.step == run.total_steps)
            if self.state.step % stage.train.log_every == 0 or self.state.step == run.total_steps or "eval/accuracy" in metrics:
                self.log.log({"stage": index, **metrics}, self.state.global_step)
            self.maybe_save(run, final=self.state.step == run.total_steps)
            bar.update(metrics)
        bar.close()
        return metrics

    # --------------------------------------------------------------------------------------------- setup
    def setup_stage(self, stage: StageConfig) -> StageRun:
        acc = self.accelerator
        objectives = {name: build_objective(self.recipe.objectives[name]) for name in stage.objectives}
        needs = set().union(*(o.needs for o in objectives.values()))
        items, stats = self.tokenized_demos(stage)
        world = acc.num_processes
        if stage.train.batch_size % world:
            raise ValueError(f"{self.recipe.source}: stages.{self.state.stage}.train.batch_size "
                             f"({stage.train.batch_size}) must be a multiple of the number of processes ({world})")
        total = stage.train.steps or max(1, math.ceil(stage.train.epochs * len(items) / stage.train.batch_size))
        builder = DemoBuilder(items, self.tokenizer.pad_token_id, self.recipe.seed + self.state.stage,
                              stage.train.batch_size, acc.process_index, world)
        unwrapped = acc.unwrap_model(self.model)
        ref = frozen_copy(unwrapped).to(acc.device) if needs & {"reference", "ref_logits"} else None
        acc.free_memory()
        optimizer = make_optimizer(unwrapped, stage)
        self.model, optimizer = acc.prepare(unwrapped, optimizer)
        scheduler = make_scheduler(optimizer, stage, total)
        return StageRun(stage, objectives, dict(stage.objectives), builder, total, optimizer, scheduler, ref,
                        {"examples": stats.kept, "truncated": stats.truncated, "dropped_overlong": stats.dropped_overlong})

    def tokenized_demos(self, stage: StageConfig):
        where = f"stages.{self.state.stage}.data"
        rows, columns = load_rows(stage.data, where)
        return tokenize_demos(to_examples(rows, columns, stage.data, where), self.tokenizer, stage.data, where)

    # ---------------------------------------------------------------------------------------------- step
    def train_step(self, run: StageRun) -> dict:
        acc, started = self.accelerator, time.perf_counter()
        batch = run.builder.batch(self.state.step)
        norm = self.global_normalizer(batch)
        micro = batch.split(run.cfg.train.micro_batch_size)
        totals: dict[str, torch.Tensor] = {}
        for i, mb in enumerate(micro):
            sync = contextlib.nullcontext() if i == len(micro) - 1 else acc.no_sync(self.model)
            with sync, acc.autocast():
                loss, parts = self.micro_loss(run, mb.trimmed().to(acc.device), norm)
                acc.backward(loss * acc.num_processes)  # DDP averages gradients over processes; undo that
            for k, v in parts.items():
                totals[k] = totals.get(k, 0.0) + v
        grad_norm = self.clip(run)
        run.optimizer.step()
        run.scheduler.step()
        run.optimizer.zero_grad(set_to_none=True)
        return self.step_metrics(run, batch, totals, grad_norm, time.perf_counter() - started)

    def micro_loss(self, run: StageRun, mb: Experience, norm: Normalizer) -> tuple[torch.Tensor, dict]:
        """sum_k w_k * aggregate_k(loss_k) on one micro-batch, plus detached per-objective parts."""
        if run.ref is not None:
            with torch.no_grad():
                ref_out = forward(run.ref, mb)
            mb.ref_logprobs, mb.ref_logits = ref_out.logprobs, ref_out.logits
        out = forward(self.model, mb)
        mask = mb.target_mask                                            # [B, L]
        total, parts = 0.0, {}
        for name, objective in run.objectives.items():
            per_token, metrics = objective(out, mb)                      # [B, L]
            agg = aggregate(per_token, mask, objective.config.aggregation, norm)
            total = total + run.weights[name] * agg
            parts[f"loss/{name}"] = agg.detach()
            for k, v in metrics.items():  # objective metrics are token means: weight by this micro-batch's share
                parts[f"{name}/{k}"] = torch.as_tensor(v, dtype=torch.float32) * (mask.sum() / max(norm.tokens, 1.0))
        parts["loss"] = total.detach()
        return total, parts

    def global_normalizer(self, batch: Experience) -> Normalizer:
        mask = batch.target_mask
        counts = torch.tensor([mask.sum(), (mask.sum(-1) > 0).sum()], dtype=torch.float64, device=self.accelerator.device)
        counts = self.accelerator.reduce(counts, "sum")
        longest = self.accelerator.reduce(mask.sum(-1).max().to(self.accelerator.device, torch.float64), "max")
        return Normalizer(tokens=float(counts[0]), seqs=float(counts[1]), max_len=float(longest))

    def clip(self, run: StageRun) -> float:
        max_norm = run.cfg.optim.max_grad_norm
        params = [p for p in self.model.parameters() if p.grad is not None]
        if max_norm > 0:
            return float(self.accelerator.clip_grad_norm_(params, max_norm))
        return float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params]))) if params else 0.0

    def step_metrics(self, run: StageRun, batch: Experience, totals: dict, grad_norm: float, seconds: float) -> dict:
        acc = self.accelerator
        names = sorted(totals)
        reduced = acc.reduce(torch.stack([torch.as_tensor(totals[k], dtype=torch.float32) for k in names]).to(acc.device), "sum")
        tokens = acc.reduce(batch.attention_mask.sum().to(acc.device), "sum")
        metrics = {k: float(v) for k, v in zip(names, reduced)}
        metrics.update(lr=run.scheduler.get_last_lr()[0], grad_norm=grad_norm, tokens_per_s=float(tokens) / seconds,
                       epoch=(self.state.step + 1) * run.cfg.train.batch_size / len(run.builder.items))
        return metrics

    # ---------------------------------------------------------------------------------- eval, checkpoints
    def maybe_evaluate(self, run: StageRun, final: bool) -> dict:
        every = run.cfg.train.eval_every
        if run.cfg.eval.data is None or not (final or (every and self.state.step % every == 0)):
            return {}
        return self.evaluate(run.cfg)

    def evaluate(self, stage: StageConfig) -> dict:
        """Greedy accuracy on the stage's held-out data, each process scoring its share."""
        import rewards

        acc, cfg = self.accelerator, stage.eval
        rows, columns = load_rows(cfg.data, f"stages.{self.state.stage}.eval.data")
        examples = to_examples(rows[: cfg.num_samples], columns, cfg.data, f"stages.{self.state.stage}.eval.data")
        mine = examples[acc.process_index :: acc.num_processes]
        model = acc.unwrap_model(self.model)
        completions = greedy_completions(model, self.tokenizer, [ex.prompt for ex in mine], cfg.max_new_tokens, cfg.batch_size)
        correct = score(rewards.get(cfg.reward), mine, completions, cfg.threshold) if mine else []
        counts = acc.reduce(torch.tensor([sum(correct), len(correct)], dtype=torch.float64, device=acc.device), "sum")
        return {"eval/accuracy": float(counts[0] / counts[1]), "eval/num_samples": int(counts[1])}

    def maybe_save(self, run: StageRun, final: bool) -> None:
        every = run.cfg.train.save_every
        if final or (every and self.state.step % every == 0):
            self.state.scheduler = run.scheduler.state_dict()
            ckpt.save(self.accelerator, self.run_dir, self.state, run.cfg.train.keep_checkpoints)

    def export_final(self) -> Path:
        """The trained policy in plain transformers format: RUN_DIR/final."""
        out = self.run_dir / "final"
        acc = self.accelerator
        acc.wait_for_everyone()
        state = acc.get_state_dict(self.model)
        if acc.is_main_process:
            acc.unwrap_model(self.model).save_pretrained(out, state_dict=state)
            self.tokenizer.save_pretrained(out)
        acc.wait_for_everyone()
        return out


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


def train(recipe: Recipe, resume: str | None = None) -> dict:
    return Trainer(recipe, resume).run()
