"""The recipe: one YAML file, typed and validated, with dotted overrides from the command line.

    output_dir, seed          where the run writes; the global seed
    model                     ModelConfig (posttrain/models.py)
    data                      DataConfig (posttrain/data.py), the default for every stage
    objectives                name -> that objective's own typed settings (`type` picks the registered objective)
    train / optim / schedule  defaults for every stage (batch sizes, length, logging; AdamW; lr schedule)
    eval                      held-out greedy accuracy with a verifier reward
    rollout                   RL stages: engine, sampling (group size), prompts per step, updates per batch
                              (posttrain/rl/config.py)
    rewards                   RL stages: the list of reward functions with weights (posttrain/rewarding/)
    logging                   trackers (TensorBoard by default, W&B) and the progress bar
    stages                    a list; each names its objectives with weights and may override train, optim,
                              schedule, data, eval and rollout (deep-merged over the top-level sections) and
                              rewards (a list: replaced, not merged)
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from posttrain.configlib import ConfigError, apply_overrides, build, deep_merge, field_doc, load_yaml, require, to_dict
from posttrain.data import DataConfig
from posttrain.mixers import MIXERS, MixerConfig
from posttrain.models import ModelConfig
from posttrain.objectives import OBJECTIVES, ObjectiveConfig, build_objective
from posttrain.ops.packing import MASKED_ATTENTION
from posttrain.rewarding import RewardSpec, build_reward_specs
from posttrain.rl.config import RolloutConfig

STAGE_SECTIONS = ("train", "optim", "schedule", "data", "eval", "rollout")   # mappings, deep-merged; `rewards` replaced


@dataclass(frozen=True)
class OptimConfig:
    """AdamW."""

    lr: float = field_doc(1e-5, "peak learning rate")
    betas: tuple[float, float] = field_doc((0.9, 0.95), "Adam beta1, beta2")
    eps: float = field_doc(1e-8, "Adam epsilon")
    weight_decay: float = field_doc(0.01, "decoupled weight decay")
    max_grad_norm: float = field_doc(1.0, "clip the global gradient norm to this (0 = no clipping)")

    def check(self) -> None:
        require(self.lr > 0, "lr", f"must be > 0, got {self.lr}")
        require(all(0 <= b < 1 for b in self.betas), "betas", f"each must be in [0, 1), got {self.betas}")
        require(self.weight_decay >= 0, "weight_decay", f"must be >= 0, got {self.weight_decay}")
        require(self.max_grad_norm >= 0, "max_grad_norm", f"must be >= 0, got {self.max_grad_norm}")


@dataclass(frozen=True)
class ScheduleConfig:
    """Learning-rate schedule (transformers' schedulers) with linear warmup."""

    name: Literal["cosine", "linear", "constant"] = field_doc("cosine", "shape after warmup")
    warmup_ratio: float = field_doc(0.03, "warmup as a fraction of the stage's steps")
    warmup_steps: int | None = field_doc(None, "warmup in steps (overrides warmup_ratio)")
    min_lr_ratio: float = field_doc(0.0, "cosine only: floor as a fraction of the peak lr")

    def check(self) -> None:
        require(0 <= self.warmup_ratio < 1, "warmup_ratio", f"must be in [0, 1), got {self.warmup_ratio}")
        require(self.warmup_steps is None or self.warmup_steps >= 0, "warmup_steps",
                f"must be >= 0, got {self.warmup_steps}")
        require(0 <= self.min_lr_ratio <= 1, "min_lr_ratio", f"must be in [0, 1], got {self.min_lr_ratio}")


@dataclass(frozen=True)
class TrainConfig:
    """Batching, length and bookkeeping of a stage."""

    batch_size: int = field_doc(64, "global batch: sequences per optimizer step over all processes (demonstration "
                                    "stages; RL stages size their batch with rollout.prompts_per_step)")
    micro_batch_size: int = field_doc(8, "sequences per forward/backward on one process")
    epochs: float | None = field_doc(None, "stage length in passes over the data (or give steps)")
    steps: int | None = field_doc(None, "stage length in steps (overrides epochs): optimizer steps, or rollout "
                                        "batches in an RL stage")
    log_every: int = field_doc(10, "log metrics every N steps")
    eval_every: int = field_doc(0, "evaluate every N steps (0 = only at the end of the stage)")
    save_every: int = field_doc(0, "checkpoint every N steps (0 = only at the end of the stage)")
    keep_checkpoints: int = field_doc(2, "step checkpoints to keep (older ones are deleted)")
    max_minutes: float | None = field_doc(None, "wall-time budget of the stage's steps: the stage ends after the "
                                                "first step that exceeds it, with its final evaluation and "
                                                "checkpoint (the lr schedule keeps its full length; --resume from that "
                                                "checkpoint "
                                                "continues the stage)")

    nonfinite: Literal["stop", "skip"] = field_doc(
        "stop", "a NaN or inf loss or gradient: stop with an error naming the step, the objective and the micro-batch, "
                "or skip that optimizer step (no update; counted as train/skipped_nonfinite)")
    max_nonfinite_skips: int = field_doc(3, "with nonfinite: skip, this many consecutive skipped steps stop the run")
    padding_free: bool = field_doc(
        False, "run the policy's training and scoring forwards on the real tokens only: each micro-batch's "
               "sequences packed end to end into fewer rows with their own position ids (posttrain/ops/packing.py); "
               "the same loss and gradients as the padded batch, without computing on padding")
    share_prompts: bool = field_doc(
        False, "run each distinct prompt of a micro-batch once in the policy's training and scoring forward: the "
               "rows that begin with it (a rollout group) follow it in one row, each continuation attending to the "
               "prompt and to itself (a 4D attention mask; posttrain/ops/packing.py); the same outputs, fewer tokens "
               "when prompts are long next to completions; attention then spans the group's total length, so it "
               "can lose with long completions. Needs sdpa or eager attention")
    compile: bool = field_doc(
        False, "torch.compile the model's backbone (the decoder layers, not the LM head) for the policy's training "
               "forward and backward; generation and scoring stay eager. The first step (and a new shape) pays "
               "a compilation of tens of seconds; on CPU it pays for models whose steps are bound by the matrix "
               "products and memory traffic, not for tiny ones bound by per-op dispatch (docs/perf.md). Not with "
               "DeepSpeed ZeRO-3")
    budget_clock: Literal["wall", "cpu"] = field_doc(
        "wall", "what max_minutes counts: wall time, or this process's CPU time (user + system), a budget that other "
                "load on a shared machine does not eat; the stage logs it as budget/minutes")

    def check(self) -> None:
        require(self.batch_size >= 1, "batch_size", f"must be >= 1, got {self.batch_size}")
        require(self.micro_batch_size >= 1, "micro_batch_size", f"must be >= 1, got {self.micro_batch_size}")
        require(self.epochs is not None or self.steps is not None, "steps", "give the stage a length: steps or epochs")
        require(self.steps is None or self.steps >= 1, "steps", f"must be >= 1, got {self.steps}")
        require(self.epochs is None or self.epochs > 0, "epochs", f"must be > 0, got {self.epochs}")
        require(self.log_every >= 1, "log_every", f"must be >= 1, got {self.log_every}")
        require(self.keep_checkpoints >= 1, "keep_checkpoints", f"must be >= 1, got {self.keep_checkpoints}")
        require(self.max_minutes is None or self.max_minutes > 0, "max_minutes", f"must be > 0, got {self.max_minutes}")
        require(self.max_nonfinite_skips >= 0, "max_nonfinite_skips", f"must be >= 0, got {self.max_nonfinite_skips}")
        require(not (self.padding_free and self.share_prompts), "share_prompts",
                "padding_free and share_prompts are two layouts of the same forward: choose one")

    @property
    def layout(self) -> str:
        """policy.forward's layout of a micro-batch (policy.LAYOUTS)."""
        return "shared_prompts" if self.share_prompts else "padding_free" if self.padding_free else "padded"


@dataclass(frozen=True)
class EvalConfig:
    """Greedy accuracy on held-out prompts, verified by a reward function."""

    data: DataConfig | None = field_doc(None, "held-out data (None = no evaluation)")
    reward: str = field_doc("exact", "reward used as the verifier: a registered name, module:function or "
                                     "file.py:function")
    threshold: float = field_doc(1.0, "a sample is correct when its reward is >= this")
    num_samples: int = field_doc(200, "evaluate the first N held-out prompts")
    max_new_tokens: int = field_doc(64, "generation budget per answer")
    batch_size: int = field_doc(64, "prompts per generate call on one process")

    def check(self) -> None:
        require(self.num_samples >= 1, "num_samples", f"must be >= 1, got {self.num_samples}")
        require(self.max_new_tokens >= 1, "max_new_tokens", f"must be >= 1, got {self.max_new_tokens}")


@dataclass(frozen=True)
class LoggingConfig:
    """Where metrics go besides RUN_DIR/metrics.jsonl."""

    report_to: list[Literal["tensorboard", "wandb"]] = field_doc(factory=lambda: ["tensorboard"],
                                                                 doc="accelerate trackers")
    project: str = field_doc("posttrain", "tracker project name")
    progress_bar: bool = field_doc(True, "show a progress bar on the main process")


@dataclass(frozen=True)
class StageConfig:
    """One stage of the recipe, after its overrides are merged over the top-level sections."""

    name: str = field_doc(doc="stage name (used in logs and checkpoints)")
    objectives: dict[str, float] = field_doc(doc="objective name (a key of `objectives:`) -> weight")
    train: TrainConfig = field_doc(factory=TrainConfig, doc="batching and length")
    optim: OptimConfig = field_doc(factory=OptimConfig, doc="optimizer")
    schedule: ScheduleConfig = field_doc(factory=ScheduleConfig, doc="lr schedule")
    data: DataConfig | None = field_doc(None, "training data")
    eval: EvalConfig = field_doc(factory=EvalConfig, doc="evaluation")
    rollout: RolloutConfig = field_doc(factory=RolloutConfig, doc="sampling and updates (stages with an RL objective)")
    rewards: list[RewardSpec] = field_doc(factory=list, doc="reward functions (stages with an RL objective)")
    mixer: MixerConfig = field_doc(factory=lambda: MIXERS.get("constant").config_cls(),
                                   doc="who sets the objectives' weights step by step: {name: constant} (the "
                                       "weights above, the default), {name: chord, mu: ...}, ... (posttrain list)")
    demo_data: DataConfig | None = field_doc(None, "demonstrations for the stage's demonstration objectives when they "
                                                   "differ from `data` (CHORD's separate expert set; null = `data`)")

    def check(self) -> None:
        require(bool(self.objectives), "objectives", "a stage needs at least one objective")
        require(self.data is not None, "data", "required value missing (give `data:` at the top level or in the stage)")


@dataclass(frozen=True)
class _RecipeFile:
    """Top-level keys of a recipe; objectives and stages are typed in a second pass."""

    output_dir: str = field_doc(doc="run directory: metrics.jsonl, checkpoints, final model")
    model: ModelConfig = field_doc(doc="the policy")
    stages: list[dict[str, Any]] = field_doc(doc="the stages, run in order")
    objectives: dict[str, dict[str, Any]] = field_doc(doc="objective name -> settings")
    seed: int = field_doc(0, "global seed")
    data: dict[str, Any] | None = field_doc(None, "default training data for every stage")
    train: dict[str, Any] = field_doc(factory=dict, doc="default train settings")
    optim: dict[str, Any] = field_doc(factory=dict, doc="default optimizer settings")
    schedule: dict[str, Any] = field_doc(factory=dict, doc="default schedule")
    eval: dict[str, Any] = field_doc(factory=dict, doc="default evaluation")
    rollout: dict[str, Any] = field_doc(factory=dict, doc="default rollout settings (RL stages)")
    rewards: list[Any] | None = field_doc(None, "default reward functions (RL stages)")
    logging: LoggingConfig = field_doc(factory=LoggingConfig, doc="trackers and progress bar")


@dataclass(frozen=True)
class Recipe:
    output_dir: str
    seed: int
    model: ModelConfig
    objectives: dict[str, ObjectiveConfig]
    stages: list[StageConfig]
    logging: LoggingConfig
    source: str = "recipe"

    def data_sections(self) -> dict[str, DataConfig | None]:
        """Key path -> DataConfig of every data section whose prompts the tokenizer renders (training and eval)."""
        out = {}
        for i, st in enumerate(self.stages):
            out[f"stages.{i}.data"], out[f"stages.{i}.eval.data"] = st.data, st.eval.data
            if st.demo_data is not None:
                out[f"stages.{i}.demo_data"] = st.demo_data
        return out


_SECTION_TYPES = {"train": TrainConfig, "optim": OptimConfig, "schedule": ScheduleConfig, "data": DataConfig,
                  "eval": EvalConfig, "rollout": RolloutConfig}


def parse_recipe(raw: dict, source: str = "recipe") -> Recipe:
    top = build(_RecipeFile, raw, "", source)
    for key, cls in _SECTION_TYPES.items():  # keys and types of the shared defaults, reported where written
        if raw.get(key) is not None:
            build(cls, raw[key], key, source, partial=True)
    if raw.get("rewards") is not None:
        build_reward_specs(raw["rewards"], "rewards", source)
    objectives = {name: _build_objective(name, spec, source) for name, spec in top.objectives.items()}
    if not top.stages:
        raise ConfigError(f"{source}: stages: a recipe needs at least one stage")
    stages = [_build_stage(i, s, raw, objectives, source) for i, s in enumerate(top.stages)]
    for i, st in enumerate(stages):
        check_layout(i, st, top.model.attn_implementation, source)
    return Recipe(top.output_dir, top.seed, top.model, objectives, stages, top.logging, source)


def check_layout(i: int, stage: StageConfig, attention: str | None, source: str) -> None:
    """train.share_prompts hands the model a ready 4D attention mask, which only sdpa and eager attention take;
    `attention` is the model's attention implementation (None: not known yet, checked again once loaded)."""
    if stage.train.share_prompts and attention is not None and attention not in MASKED_ATTENTION:
        raise ConfigError(f"{source}: stages.{i}.train.share_prompts: needs the model's attention to be sdpa or eager "
                          f"(it takes a 4D mask), the model's is {attention!r}; set model.attn_implementation: sdpa "
                          "or turn share_prompts off")


def _build_objective(name: str, spec: dict, source: str) -> ObjectiveConfig:
    spec = dict(spec or {})
    spec.setdefault("type", name)
    if spec["type"] not in OBJECTIVES:
        raise ConfigError(f"{source}: objectives.{name}.type: unknown objective {spec['type']!r}; "
                          f"registered: {', '.join(OBJECTIVES.names())}")
    return build(OBJECTIVES.get(spec["type"]).config_cls, spec, f"objectives.{name}", source)


def _build_stage(i: int, stage: Any, raw: dict, objectives: dict, source: str) -> StageConfig:
    if not isinstance(stage, dict):
        raise ConfigError(f"{source}: stages.{i}: expected a mapping, got {stage!r}")
    merged = dict(stage)
    for key in STAGE_SECTIONS:
        base = raw.get(key)
        if base is not None or key in stage:
            mergeable = isinstance(stage.get(key, {}), dict)
            merged[key] = deep_merge(base or {}, stage.get(key) or {}) if mergeable else stage[key]
    merged.setdefault("name", f"stage{i}")
    rewards = stage["rewards"] if "rewards" in stage else raw.get("rewards")
    if rewards is not None:
        where = f"stages.{i}.rewards" if "rewards" in stage else "rewards"
        merged["rewards"] = [to_dict(spec) for spec in build_reward_specs(rewards, where, source)]
    for key, cls in _SECTION_TYPES.items():  # report a section's errors where it is written: stage or top level
        if isinstance(merged.get(key), dict) and (key != "data" or "source" in merged[key]):
            build(cls, merged[key], f"stages.{i}.{key}" if key in stage else key, source)
    mixer = _build_mixer(i, stage.get("mixer"), source)
    cfg = build(StageConfig, {**merged, "mixer": None}, f"stages.{i}", source)
    cfg = dataclasses.replace(cfg, mixer=mixer)
    for name, weight in cfg.objectives.items():
        if name not in objectives:
            raise ConfigError(f"{source}: stages.{i}.objectives.{name}: not defined under `objectives:`; "
                              f"defined: {', '.join(sorted(objectives)) or '(none)'}")
        if weight < 0:
            raise ConfigError(f"{source}: stages.{i}.objectives.{name}: weight must be >= 0, got {weight}")
    for name in cfg.mixer.objective_names():
        if name not in cfg.objectives:
            raise ConfigError(f"{source}: stages.{i}.mixer: names objective {name!r}, which is not in the stage's "
                              f"objectives ({', '.join(cfg.objectives)})")
    _check_rollout_stage(i, cfg, objectives, source)
    return cfg


def _build_mixer(i: int, raw: Any, source: str) -> MixerConfig:
    """The stage's typed mixer config (`name` picks the registered mixer; default constant)."""
    spec = {"name": "constant"} if raw is None else raw
    if not isinstance(spec, dict):
        raise ConfigError(f"{source}: stages.{i}.mixer: expected a mapping such as {{name: chord}}, got {spec!r}")
    spec = {"name": "constant", **spec}
    if spec["name"] not in MIXERS:
        raise ConfigError(f"{source}: stages.{i}.mixer.name: unknown mixer {spec['name']!r}; registered: "
                          f"{', '.join(MIXERS.names())}")
    return build(MIXERS.get(spec["name"]).config_cls, spec, f"stages.{i}.mixer", source)


def _check_rollout_stage(i: int, cfg: StageConfig, objectives: dict, source: str) -> None:
    """A stage whose objectives learn from rollouts has rewards, and its rollout objectives agree on one plan."""
    rl = {name: build_objective(objectives[name]) for name in cfg.objectives}
    rl = {name: o for name, o in rl.items() if o.source == "rollouts"}
    if not rl:
        return
    first = next(iter(rl))
    if not cfg.rewards:
        raise ConfigError(f"{source}: stages.{i}.rewards: objective {first!r} learns from rollouts and needs rewards: "
                          "give `rewards:` at the top level or in the stage, e.g. [{name: gsm8k}]")
    plans = {name: o.rollout_plan() for name, o in rl.items()}
    for name, plan in plans.items():
        if plan != plans[first]:
            raise ConfigError(f"{source}: stages.{i}.objectives: {first!r} and {name!r} both learn from rollouts but "
                              "ask "
                              "for different rollouts (advantages, KL placement, sampling or demonstrations in the "
                              "groups); give them one rollout plan or separate stages")


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    raw = apply_overrides(load_yaml(path), overrides or [], source=str(path))
    return parse_recipe(raw, str(path))


def resolved_dict(path: str | Path, overrides: list[str] | None = None) -> dict:
    """The recipe after overrides, validation and defaults, as plain data (for `posttrain config show`)."""
    return recipe_dict(load_recipe(path, overrides))


def recipe_dict(r: Recipe) -> dict:
    """A parsed recipe as plain data (what `posttrain config show` prints, and a run records in RUN_DIR/recipe.yaml)."""
    return {"output_dir": r.output_dir, "seed": r.seed, "model": to_dict(r.model),
            "objectives": {k: to_dict(v) for k, v in r.objectives.items()},
            "logging": to_dict(r.logging), "stages": [to_dict(s) for s in r.stages]}
