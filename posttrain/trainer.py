"""The training loop: stages of mixed objectives over experience, on accelerate. Read top to bottom.

    for stage in recipe.stages:                          (data loaded and checked for every stage before the model)
        objectives, mixer, sources (demonstrations, rollouts), optimizer, schedule  <- the stage's config
        for step in stage:
            weights = mixer.plan(step)                   objective -> weight; a source no weighted objective reads
                                                         this step is not built (no generation on an SFT-only step)
            demos   = DemoBuilder.next_batch()           (sources/demos.py)
            rollouts = RolloutBuilder.collect()          (generate, reward, advantages; sources/rollouts.py)
            for pass in num_iterations: for mini in mini-batches: optimize({source: mini})
            mixer.observe(step, metrics); log, evaluate, checkpoint

    optimize({source: batch}):
        norms = global token / sequence counts per (source, term tokens), over all micro-batches and processes
        for source in (demos, rollouts): for micro in batch[source]:
            out = policy(micro) at the source's temperature (1 for demonstrations, the sampling T for rollouts)
            loss = sum_k w_k sum_terms aggregate(objective_k(out)[term], that term's tokens, norms); backward
        clip, optimizer.step, scheduler.step

Metrics: objective metrics are token means (weighted by each micro-batch's share of the step's tokens, so their sum
is the exact global mean), except names ending in /min or /max, reduced by min / max. A rollout objective's metrics
keep their own names (kl, entropy, clip_ratio/low, ...); a demonstration objective's are `<objective>/<name>`.
`loss/<objective>` is each objective's aggregated loss (unweighted), `mix/<objective>` its weight this step.
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
from posttrain.config import Recipe, StageConfig, check_layout
from posttrain.configlib import ConfigError
from posttrain.evaluation import greedy_verdicts, held_out_examples
from posttrain.experience import Experience
from posttrain.metrics import MetricsLog, Progress, init_trackers
from posttrain.mixers import Mixer, MixPlan, StepReport, build_mixer
from posttrain.models import (
    AdapterDisabledReference,
    frozen_copy,
    is_zero3,
    load_model,
    load_tokenizer,
    resolve_model_path,
    save_merged,
)
from posttrain.objectives import Normalizer, aggregate
from posttrain.policy import attention_implementation, forward
from posttrain.rewarding import load_rewards
from posttrain.rl.value_head import ValueHeadModel
from posttrain.rollout import ENGINES
from posttrain.sources import DemoBuilder, RolloutBuilder
from posttrain.sources.prepare import StageData, prepare_stage

METRIC_NAMES = {"pg_loss": "loss/policy", "vf_loss": "loss/value"}   # objective metric -> the name users know
SOURCES = ("demos", "rollouts")   # the order micro-batches run in within an optimizer step


def reduction(name: str) -> str:
    """How a metric combines over micro-batches, processes and updates: min, max, or (token-weighted) sum / mean."""
    return "min" if name.endswith("/min") else "max" if name.endswith("/max") else "sum"


def make_accelerator(recipe: Recipe, mixed_precision: str = "no"):
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and "LOCAL_RANK" not in os.environ:   # accelerate would set up one process; each would train alone
        raise ConfigError(f"WORLD_SIZE is {world} but LOCAL_RANK is not set, so the processes would not form a group "
                          "(each would train alone on all the data into the same run directory); start them with "
                          "`accelerate launch` (on CPU: ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu "
                          "--num_processes N), torchrun or the DeepSpeed launcher, which set it")
    # Several CPU processes talk over gloo (DeepSpeed through accelerate needs it named explicitly).
    handlers = [InitProcessGroupKwargs(backend="gloo")] if world > 1 and not torch.cuda.is_available() else []
    acc = Accelerator(log_with=list(recipe.logging.report_to) or None, project_dir=recipe.output_dir,
                      mixed_precision=mixed_precision, kwargs_handlers=handlers)
    if acc.num_processes != world:
        raise ConfigError(f"the launcher started {world} process(es) (WORLD_SIZE) but accelerate set up "
                          f"{acc.num_processes}; on CPU launch with ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu "
                          "--num_processes N (`--cpu --num_processes N` starts one)")
    return acc


@dataclass
class StageRun:
    """Everything built for one stage."""

    cfg: StageConfig
    objectives: dict            # name -> objective
    mixer: Mixer
    demos: DemoBuilder | None
    rollouts: RolloutBuilder | None
    total_steps: int            # stage steps (one demonstration batch and/or one rollout batch each)
    minis: int                  # mini-batches per pass over a step's experience (rollout.mini_batch_size)
    passes: int                 # passes over a step's experience (rollout.num_iterations)
    optimizer: torch.optim.Optimizer
    scheduler: object
    ref: torch.nn.Module | None
    data_stats: dict
    validation: DemoBuilder | None = None   # held-out demonstrations for a mixer's meta-gradient
    engine_stale: bool = False  # the weights changed since the rollout engine last synced them

    def temperature(self, source: str) -> float:
        """Policy log-probs are log softmax(z / T): T = 1 for demonstrations, the sampling temperature for rollouts."""
        return self.rollouts.temperature if source == "rollouts" else 1.0

    def reading(self, source: str, weights: dict[str, float]) -> list[str]:
        """The weighted objectives that read `source`, in recipe order."""
        return [n for n, o in self.objectives.items() if o.source == source and n in weights]

    @functools.cached_property
    def demo_needs(self) -> frozenset[str]:
        """What the demonstration objectives need from the trainer (a reference pass per micro-batch)."""
        return frozenset().union(*(o.needs for o in self.objectives.values() if o.source == "demos"))


class Trainer:
    def __init__(self, recipe: Recipe, resume: str | None = None, data: list[StageData] | None = None):
        """`data`: every stage's prepared data, when preflight (posttrain train) has prepared it already."""
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
        self.rewards = {i: load_rewards(st.rewards, f"stages.{i}.rewards", recipe.source)   # resolved before training
                        for i, st in enumerate(recipe.stages) if st.rewards}
        self.data = data or [prepare_stage(recipe, i, self.tokenizer, acc.num_processes)
                             for i in range(len(recipe.stages))]
        self.model = load_model(path, recipe.model)                  # the first expensive step: after every check
        for i, stage in enumerate(recipe.stages):                      # the attention transformers chose, if not set
            check_layout(i, stage, attention_implementation(self.model), recipe.source)
        self.model.train()
        self.log = MetricsLog(acc, self.run_dir)
        if acc.is_main_process:
            ckpt.remove_temporaries(self.run_dir)
        self.resume_from = ckpt.resolve(self.run_dir, resume, report=acc.is_main_process) if resume else None
        self.state = ckpt.read_state(self.resume_from) if self.resume_from else ckpt.RunState()
        if self.resume_from:
            self.log.drop_after(self.state.global_step, self.state.stage)
        else:                               # a fresh run (or `--resume auto` before any checkpoint): a fresh file
            self.log.start_over()
        init_trackers(acc, recipe)

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
        if self.deepspeed is not None:
            self.accelerator.free_memory()   # destroy the DeepSpeed engine before its process group goes
        self.accelerator.end_training()
        return results

    def run_stage(self, index: int, stage: StageConfig) -> dict:
        acc = self.accelerator
        self.state.stage, self.state.stage_name = index, stage.name
        run = self.setup_stage(index)
        if self.resume_from is not None:
            acc.load_state(str(self.resume_from))
            run.scheduler.load_state_dict(self.state.scheduler)
            self.resume_from = None
        self.log.stage_header(index, {"stage_name": stage.name, **{f"data/{k}": v for k, v in run.data_stats.items()}},
                              self.state.global_step)
        bar = Progress(acc.is_main_process and self.recipe.logging.progress_bar, run.total_steps, self.state.step,
                       f"{stage.name}")
        metrics: dict = {}
        started, rewards = budget_clock(stage), []
        try:
            while self.state.step < run.total_steps:
                metrics = self.train_step(run)
                if "reward/mean" in metrics:
                    rewards.append(metrics["reward/mean"])
                self.state.step += 1
                self.state.global_step += 1
                last = self.out_of_time(stage, started, metrics) or self.state.step == run.total_steps
                metrics |= self.maybe_evaluate(run, final=last)
                if self.state.step % stage.train.log_every == 0 or last or "eval/accuracy" in metrics:
                    self.log.log({"stage": index, **metrics}, self.state.global_step)
                self.maybe_save(run, final=last)
                bar.update(metrics)
                if last:
                    break
        finally:
            if run.rollouts is not None:
                run.rollouts.close()
        bar.close()
        if rewards and acc.is_main_process:
            print(reward_summary(stage.name, rewards, metrics.get("eval/accuracy")), flush=True)
        return metrics

    def out_of_time(self, stage: StageConfig, started: float, metrics: dict) -> bool:
        """Whether the stage's `train.max_minutes` is spent (by its budget clock, since `started`); every process
        gets the slowest process's answer, logged as budget/minutes."""
        if stage.train.max_minutes is None:
            return False
        spent = torch.tensor(budget_clock(stage) - started, device=self.accelerator.device)
        minutes = float(self.accelerator.reduce(spent, "max")) / 60.0
        metrics["budget/minutes"] = minutes
        return minutes > stage.train.max_minutes

    # --------------------------------------------------------------------------------------------- setup
    def setup_stage(self, index: int) -> StageRun:
        """Build stage `index` (recipe.stages[index]): its objectives, mixer, builders, optimizer and scheduler."""
        acc, stage = self.accelerator, self.recipe.stages[index]
        data: StageData = self.data[index]
        objectives = data.objectives
        needs = set().union(*(o.needs for o in objectives.values()))
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
        if stage.train.compile and is_zero3(self.model):
            raise ConfigError(f"{self.recipe.source}: stages.{index}.train.compile: torch.compile of a ZeRO-3 "
                              "partitioned model is not supported; turn compile off or use ZeRO-2")
        demos = self.demo_builder(stage, data) if data.demos is not None else None
        rollouts = self.rollout_builder(stage, data) if data.prompts is not None else None   # samples self.model
        minis, passes = (stage.rollout.updates_per_step // stage.rollout.num_iterations, stage.rollout.num_iterations) \
            if rollouts is not None else (1, 1)
        if stage.train.steps:
            total = stage.train.steps
        elif rollouts is not None:
            total = max(1, math.ceil(stage.train.epochs * len(data.prompts) / stage.rollout.prompts_per_step))
        else:
            total = max(1, math.ceil(stage.train.epochs * len(data.demos) / stage.train.batch_size))
        scheduler = make_scheduler(optimizer, stage, total * minis * passes)   # the schedule counts optimizer steps
        mixer = build_mixer(stage.mixer, dict(stage.objectives), self.recipe.seed + index)
        mixer.load_state_dict(self.state.extras.get("mixer", {}))
        validation = None
        if data.validation is not None and acc.state.deepspeed_plugin is not None:
            raise ConfigError(f"{self.recipe.source}: stages.{index}.mixer: {stage.mixer.name!r} takes meta-gradients "
                              "as plain tensors, which DeepSpeed partitions; run it with DDP (or set meta_lr: 0)")
        if data.validation is not None:
            validation = DemoBuilder(data.validation, self.tokenizer.pad_token_id, self.recipe.seed + index + 7919,
                                     stage.train.batch_size, acc.process_index, acc.num_processes)
            validation.load_state_dict(self.state.extras.get("validation", {"cursor": 0}))
        return StageRun(stage, objectives, mixer, demos, rollouts, total, minis, passes, optimizer, scheduler, ref,
                        data.stats, validation)

    def value_head_model(self, backbone: torch.nn.Module) -> ValueHeadModel:
        """The backbone with a fresh value head, initialised from the recipe seed and the stage alone (the same on
        every process and under any launcher; the global RNG stream is left as it was)."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.recipe.seed + self.state.stage)
            return ValueHeadModel(backbone)

    def demo_builder(self, stage: StageConfig, data: StageData) -> DemoBuilder:
        acc, extras = self.accelerator, self.state.extras
        builder = DemoBuilder(data.demos, self.tokenizer.pad_token_id, self.recipe.seed + self.state.stage,
                              stage.train.batch_size, acc.process_index, acc.num_processes)
        # a checkpoint from before the cursor existed: a demonstration-only stage was at step * batch_size
        builder.load_state_dict(extras.get("demos", {"cursor": self.state.step * stage.train.batch_size}))
        return builder

    def rollout_builder(self, stage: StageConfig, data: StageData) -> RolloutBuilder:
        acc, index = self.accelerator, self.state.stage
        engine = ENGINES.get(stage.rollout.engine)(self.model, self.tokenizer, stage.rollout.engine_args, acc)
        builder = RolloutBuilder(data.prompts, stage.rollout, data.plan, self.rewards[index], engine, self.tokenizer,
                                 acc, self.recipe.seed + index, stage.train.micro_batch_size, stage.train.layout)
        builder.load_state_dict(self.state.extras.get("rollout", {}))
        return builder

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
        if not is_zero3(backbone):
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
        """One stage step: the mixer's plan, the experience it reads, `passes` x `minis` optimizer steps, the report."""
        acc, step, started = self.accelerator, self.state.step, time.perf_counter()
        plan = run.mixer.plan(step)
        active = {name: w for name, w in plan.weights.items() if w != 0.0}
        if not active:
            raise RuntimeError(f"stage {run.cfg.name!r}: mixer {run.cfg.mixer.name!r} gave every objective weight 0 "
                               f"at step {step}; nothing to train")
        batches, metrics, synced = self.experience(run, active, plan)
        if "rollouts" in batches:
            self.check_advantages(run, batches["rollouts"])
        report = StepReport(metrics, run.rollouts.outcomes if "rollouts" in batches else [])
        if plan.meta_gradient is not None:
            report.val_dots = self.meta_gradient(run, batches, active, plan.meta_gradient)
        trained, updates = time.perf_counter(), []
        for _ in range(run.passes):
            for minis in self.mini_batches(run, batches):
                updates.append(self.optimize(run, minis, active))
                run.engine_stale = run.rollouts is not None
        done = time.perf_counter()
        tokens = acc.reduce(sum(b.attention_mask.sum() for b in batches.values()).to(acc.device), "sum")
        metrics |= combine_updates(updates) | {f"mix/{name}": w for name, w in plan.weights.items()} | {
            "time/train": done - trained, "time/step": done - started,
            "tokens_per_s": float(tokens) / (done - started), "optimizer_steps": float(len(updates))}
        if "rollouts" in batches:
            metrics["time/sync"] = synced
        if "demos" in batches:
            metrics["epoch" if "rollouts" not in batches else "epoch/demos"] = run.demos.epoch
        run.mixer.observe(step, report)
        return metrics | run.mixer.metrics()

    def check_advantages(self, run: StageRun, batch: Experience) -> None:
        """Non-finite advantages (any process) stop the run: train.nonfinite cannot skip a batch it never trained on,
        and the rewards that feed them are checked by the reward executor already."""
        bad = torch.tensor(float(not bool(torch.isfinite(batch.advantages).all())), device=self.accelerator.device)
        if float(self.accelerator.reduce(bad, "sum")) > 0:
            raise NonFiniteError(f"stage {run.cfg.name!r} step {self.state.global_step + 1}: the rollout batch has "
                                 "non-finite advantages (the rewards were finite: check the advantage estimator's "
                                 "settings, e.g. std_eps 0 with tiny reward differences); nothing was trained on them")

    def experience(self, run: StageRun, weights: dict[str, float], plan: MixPlan
                   ) -> tuple[dict[str, Experience], dict, float]:
        """The sources the weighted objectives read this step -> ({source: this process's batch}, the rollout metrics,
        seconds spent syncing the rollout engine's weights first)."""
        batches, metrics, synced = {}, {}, 0.0
        if run.reading("rollouts", weights):
            if run.engine_stale:
                tick = time.perf_counter()
                run.rollouts.engine.sync_weights(self.model)
                run.engine_stale, synced = False, time.perf_counter() - tick
            batches["rollouts"], metrics = run.rollouts.collect(self.accelerator.unwrap_model(self.model), run.ref,
                                                                self.state.step)
        if run.reading("demos", weights):
            batches["demos"] = run.demos.next_batch() if plan.demo_rows is None else run.demos.rows(plan.demo_rows)
        return batches, metrics, synced

    def mini_batches(self, run: StageRun, batches: dict[str, Experience]) -> list[dict[str, Experience]]:
        """The optimizer steps of one pass: {source: mini-batch k} for k < run.minis."""
        split = {"rollouts": lambda b: run.rollouts.mini_batches(b),
                 "demos": lambda b: run.demos.mini_batches(b, run.minis)}
        parts = {source: split[source](batch) for source, batch in batches.items()}
        return [{source: mb[k] for source, mb in parts.items()} for k in range(run.minis)]

    def optimize(self, run: StageRun, batches: dict[str, Experience], weights: dict[str, float]) -> dict:
        """One optimizer step on this process's share of each source's global batch -> metrics reduced over processes.
        A non-finite loss or gradient never reaches the weights (train.nonfinite: skip the step, or stop)."""
        totals = self.accumulate(run, batches, weights)
        grad_norm = self.clip(run)
        problem = self.nonfinite(run, totals, grad_norm)
        if problem is not None:
            run.optimizer.zero_grad(set_to_none=True)
            return self.reduce_metrics(totals) | self.skip(run, problem) | {"lr": run.scheduler.get_last_lr()[0],
                                                                             "grad_norm": grad_norm}
        run.optimizer.step()
        run.scheduler.step()
        run.optimizer.zero_grad(set_to_none=True)
        self.state.extras["consecutive_nonfinite"] = 0
        return self.reduce_metrics(totals) | {"lr": run.scheduler.get_last_lr()[0], "grad_norm": grad_norm,
                                              "train/skipped_nonfinite": 0.0}

    @property
    def deepspeed(self):
        """accelerate's DeepSpeed engine wrapper, or None."""
        return getattr(self.accelerator, "deepspeed_engine_wrapped", None)

    def stop_if_nonfinite_before_deepspeed_step(self, run: StageRun, totals: dict) -> None:
        """Under DeepSpeed the engine steps inside the last backward, so a step cannot be skipped afterwards: a
        non-finite loss on any process stops the run before that backward (a non-finite gradient from finite losses
        is DeepSpeed's to handle)."""
        problem = self.nonfinite(run, dict(totals), 0.0)
        if problem is not None:
            raise NonFiniteError(f"stage {run.cfg.name!r} step {self.state.global_step + 1}: {problem}; under "
                                 "DeepSpeed "
                                 "the step cannot be skipped, so the run stops before the update")

    def nonfinite(self, run: StageRun, totals: dict, grad_norm: float) -> str | None:
        """What was not finite in this optimizer step, on any process (the same answer everywhere), or None: the
        micro-batch losses (`totals["nonfinite"]` names the first, see accumulate) and the global gradient norm."""
        local = totals.pop("nonfinite", None)
        flags = torch.tensor([float(local is not None), float(not math.isfinite(grad_norm))],
                             device=self.accelerator.device)
        flags = self.accelerator.reduce(flags, "sum")
        if not bool(flags.any()):
            return None
        if local is not None:
            return f"{local} (process {self.accelerator.process_index})"
        if flags[0] > 0:
            return "a non-finite loss on another process"
        return f"a non-finite gradient (global norm {grad_norm})"

    def skip(self, run: StageRun, problem: str) -> dict:
        """train.nonfinite: stop with the error naming the step and what was not finite, or skip the update and count
        it; train.max_nonfinite_skips consecutive skips stop the run."""
        cfg, step = run.cfg.train, self.state.global_step + 1
        where = f"stage {run.cfg.name!r} step {step}"
        streak = self.state.extras.get("consecutive_nonfinite", 0) + 1
        if cfg.nonfinite == "stop" or streak > cfg.max_nonfinite_skips:
            why = "" if cfg.nonfinite == "stop" else f" ({streak} consecutive steps skipped; max_nonfinite_skips is " \
                                                     f"{cfg.max_nonfinite_skips})"
            raise NonFiniteError(f"{where}: {problem}; the update was not applied{why}")
        self.state.extras["consecutive_nonfinite"] = streak
        self.state.extras["skipped_nonfinite"] = self.state.extras.get("skipped_nonfinite", 0) + 1
        if self.accelerator.is_main_process:
            print(f"posttrain: warning: {where}: {problem}; update skipped", flush=True)
        return {"train/skipped_nonfinite": 1.0,
                "train/skipped_nonfinite_total": float(self.state.extras["skipped_nonfinite"])}

    def accumulate(self, run: StageRun, batches: dict[str, Experience], weights: dict[str, float]) -> dict:
        """Forward and backward over every micro-batch of every source: the parameters' .grad is the gradient of the
        step's loss (synchronised over processes on the last backward) -> the step's metric parts."""
        acc = self.accelerator
        norms = self.global_normalizers(run, batches, weights)
        work = [(source, mb) for source in SOURCES if source in batches
                for mb in batches[source].split(run.cfg.train.micro_batch_size)]
        totals: dict = {}
        for i, (source, mb) in enumerate(work):
            last = i == len(work) - 1
            sync = contextlib.nullcontext() if last else acc.no_sync(self.model)
            with sync, acc.autocast():
                loss, parts = self.micro_loss(run, source, mb.trimmed().to(acc.device), norms, weights)
                if "nonfinite" not in totals and not bool(torch.isfinite(loss)):
                    bad = [k[5:] for k, v in parts.items() if k.startswith("loss/") and not bool(torch.isfinite(v))]
                    totals["nonfinite"] = (f"a non-finite loss ({loss.detach().item()}) in objective "
                                           f"{', '.join(map(repr, bad)) or '?'} on {source} micro-batch {i}")
                if last and self.deepspeed is not None:   # its last backward also steps: check every process first
                    self.stop_if_nonfinite_before_deepspeed_step(run, totals)
                self.backward(loss * acc.num_processes, last=last)   # DDP/ZeRO average over processes
            for k, v in parts.items():
                totals[k] = v if k not in totals else _combine(reduction(k), totals[k], v)
        return totals

    def meta_gradient(self, run: StageRun, batches: dict[str, Experience], weights: dict[str, float],
                      validation: str) -> dict[str, float]:
        """<grad L_val, grad L_k> for each weighted objective k on this step's experience, before the update; L_val is
        objective `validation` on a batch of held-out demonstrations (the stage's eval data). Gradients are the
        global ones (averaged over processes by the same backward as training)."""
        def gradient(b: dict[str, Experience], name: str) -> torch.Tensor:
            self.accumulate(run, b, {name: 1.0})
            params = [p for p in self.model.parameters() if p.requires_grad]
            flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten().float()
                              for p in params])
            run.optimizer.zero_grad(set_to_none=True)
            return flat

        g_val = gradient({"demos": run.validation.next_batch()}, validation)          # grad L_val
        out = {}
        for name in weights:
            source = run.objectives[name].source
            out[name] = float(g_val @ gradient({source: batches[source]}, name))        # <grad L_val, grad L_k>
        return out

    def micro_loss(self, run: StageRun, source: str, mb: Experience, norms: dict, weights: dict[str, float]
                   ) -> tuple[torch.Tensor, dict]:
        """sum_k w_k sum_terms aggregate(loss_k[term]) over the objectives reading `source`, on one micro-batch; plus
        detached parts for the metrics."""
        if source == "demos" and run.ref is not None and run.demo_needs & {"reference", "ref_logits"}:
            with torch.no_grad():                                        # rollouts carry ref_logprobs from collection
                ref_out = forward(run.ref, mb, logprobs="reference" in run.demo_needs,
                                  logits="ref_logits" in run.demo_needs, layout=run.cfg.train.layout)
            mb.ref_logprobs = ref_out.logprobs
            mb.ref_logits = ref_out.logits
        needs = frozenset().union(*(run.objectives[n].needs for n in run.reading(source, weights)))
        out = forward(self.model, mb, run.temperature(source), logits="logits" in needs, entropy="entropy" in needs,
                      layout=run.cfg.train.layout, compiled=run.cfg.train.compile)
        total, parts = 0.0, {}
        for name in run.reading(source, weights):
            objective = run.objectives[name]
            result, metrics = objective(out, mb)
            losses = objective_terms(name, objective, result)             # term -> [B, L]
            loss, share = 0.0, None
            for term_name, term in objective.terms.items():
                mask = term_mask(mb, term.tokens)                          # [B, L]
                norm = norms[(source, term.tokens)]
                agg = aggregate(losses[term_name], mask, term.aggregation, norm)
                loss = loss + agg
                share = mask.sum() / max(norm.tokens, 1.0) if share is None else share   # of the first term's tokens
                if len(objective.terms) > 1:
                    parts[f"loss/{name}/{term_name}"] = agg.detach()
            total = total + weights[name] * loss
            parts[f"loss/{name}"] = loss.detach()
            prefix = "" if source == "rollouts" else f"{name}/"
            for k, v in metrics.items():  # token means: weighted by the share (their sum is the global mean)
                key = prefix + METRIC_NAMES.get(k, k)
                v = torch.as_tensor(v, dtype=torch.float32)
                parts[key] = v * share if reduction(key) == "sum" else v
        parts["loss"] = total.detach()
        return total, parts

    def global_normalizers(self, run: StageRun, batches: dict[str, Experience], weights: dict[str, float]) -> dict:
        """(source, term tokens) -> Normalizer: token and sequence counts of those tokens in the whole optimizer step
        over all processes; L_max = the rollout's generation budget, or the longest loss span of the demonstrations."""
        acc = self.accelerator
        keys = sorted({(o.source, t.tokens) for n, o in run.objectives.items() if n in weights and o.source in batches
                       for t in o.terms.values()}, key=lambda k: (k[0], sorted(k[1])))
        counts, spans = [], []
        for source, tokens in keys:
            mask = term_mask(batches[source], tokens)                                           # [B, L]
            counts.append(torch.stack([mask.sum(), (mask.sum(-1) > 0).sum()]).to(torch.float64))
            spans.append(mask.sum(-1).max().to(torch.float64) if mask.numel() else torch.zeros((), dtype=torch.float64))
        counts = acc.reduce(torch.stack(counts).to(acc.device), "sum")                          # [K, 2]
        spans = acc.reduce(torch.stack(spans).to(acc.device), "max")                            # [K]
        budget = float(run.cfg.rollout.sampling.max_new_tokens)
        return {key: Normalizer(float(c[0]), float(c[1]), budget if key[0] == "rollouts" else float(span))
                for key, c, span in zip(keys, counts, spans)}

    def backward(self, loss: torch.Tensor, last: bool) -> None:
        """accelerate's backward, except under DeepSpeed: its engine scales by 1 / its accumulation steps and steps
        the optimizer inside every backward, so the trainer tells it which micro-batch ends the optimizer step (the
        engine then clips, steps and zeroes the gradients; optimizer.step / zero_grad are no-ops there)."""
        engine = self.deepspeed
        if engine is None:
            self.accelerator.backward(loss)
        else:
            engine.backward(loss, sync_gradients=last)

    def clip(self, run: StageRun) -> float:
        engine = self.deepspeed
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
            self.state.extras["mixer"] = run.mixer.state_dict()
            if run.rollouts is not None:
                self.state.extras["rollout"] = run.rollouts.state_dict()
            if run.demos is not None:
                self.state.extras["demos"] = run.demos.state_dict()
            if run.validation is not None:
                self.state.extras["validation"] = run.validation.state_dict()
            ckpt.save(self.accelerator, self.run_dir, self.state, run.cfg.train.keep_checkpoints)

    def export_final(self) -> Path:
        """The trained policy in plain transformers format: RUN_DIR/final."""
        out, tmp = self.run_dir / "final", self.run_dir / ckpt.FINAL_TMP     # written aside, renamed when complete
        acc = self.accelerator
        acc.wait_for_everyone()
        state = acc.get_state_dict(self.model)
        if acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            acc.unwrap_model(self.model).save_pretrained(tmp, state_dict=state)   # with LoRA: the adapter
            self.tokenizer.save_pretrained(tmp)
        if self.recipe.model.lora is not None and self.recipe.model.lora.merge:
            save_merged(acc.unwrap_model(self.model), tmp / "merged", self.tokenizer, acc.is_main_process)
        if acc.is_main_process:
            ckpt.replace_directory(tmp, out)
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


class NonFiniteError(RuntimeError):
    """A NaN or inf in a loss, a gradient or the advantages, with the step and where it was found."""


def objective_terms(name: str, objective, result) -> dict:
    """An objective's per-token losses by term: a tensor for a one-term objective, a dict naming every term else."""
    declared = set(objective.terms)
    losses = result if isinstance(result, dict) else {next(iter(objective.terms)): result}
    if set(losses) != declared or (not isinstance(result, dict) and len(declared) > 1):
        raise ValueError(f"objective {name!r} returned losses for {sorted(losses)} but declares terms "
                         f"{sorted(declared)}")
    return losses


def term_mask(exp: Experience, tokens: frozenset[int]) -> torch.Tensor:
    """[B, L] float mask of the predicted tokens that carry loss and whose provenance is in `tokens`."""
    kinds = torch.tensor(sorted(tokens), device=exp.source.device)
    return exp.target_mask * torch.isin(exp.source[:, 1:], kinds)


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


def budget_clock(stage: StageConfig) -> float:
    """Seconds by the clock `train.max_minutes` counts: wall time, or this process's CPU time."""
    return time.process_time() if stage.train.budget_clock == "cpu" else time.perf_counter()


def reward_summary(stage: str, rewards: list[float], accuracy: float | None) -> str:
    """One line at the end of an RL stage: the mean reward of its first and last tenth of steps.

    >>> reward_summary("grpo", [0.1, 0.2, 0.3, 0.5], 0.75)
    'stage grpo: reward/mean 0.100 (first 1 steps) -> 0.500 (last 1 steps) over 4 steps; eval/accuracy 0.750'
    """
    k = max(1, len(rewards) // 10)
    line = (f"stage {stage}: reward/mean {sum(rewards[:k]) / k:.3f} (first {k} steps) -> "
            f"{sum(rewards[-k:]) / k:.3f} (last {k} steps) over {len(rewards)} steps")
    return line + (f"; eval/accuracy {accuracy:.3f}" if accuracy is not None else "")


def train(recipe: Recipe, resume: str | None = None, data: list[StageData] | None = None) -> dict:
    return Trainer(recipe, resume, data).run()
