"""A stage's data, loaded, tokenized and checked before any model is built.

For each stage: the objectives (built from their configs), the demonstrations its demonstration objectives read
(`demo_data`, or `data`), the prompts its rollout objectives read (`data`, with their demonstrations when the
rollout plan puts demonstrations or prefixes into the groups). Every problem is a ConfigError naming the recipe, the
stage, the source and the column, raised before the trainer loads the model.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from posttrain.configlib import ConfigError
from posttrain.data import Tokenized, TokenStats, load_rows, require_prompts, to_examples, tokenize_demos
from posttrain.objectives import build_objective
from posttrain.sources.plan import RolloutPlan
from posttrain.sources.rollouts import Prompt, check_demonstrations, check_world, rollout_prompts


@dataclass
class StageData:
    objectives: dict                          # name -> objective
    demos: list[Tokenized] | None = None      # demonstrations (when a demonstration objective is in the stage)
    prompts: list[Prompt] | None = None       # rollout prompts (when a rollout objective is in the stage)
    plan: RolloutPlan | None = None           # the stage's rollout plan
    validation: list[Tokenized] | None = None  # held-out demonstrations (a mixer's meta-gradient): eval data
    stats: dict = field(default_factory=dict)  # logged as data/<key> when the stage starts

    def reads(self, source: str) -> bool:
        return any(o.source == source for o in self.objectives.values())


def prepare_stage(recipe, index: int, tokenizer, world: int) -> StageData:
    """Load and check stage `index` of `recipe` for `world` processes (no model needed)."""
    stage, where = recipe.stages[index], f"{recipe.source}: stages.{index}"
    data = StageData({name: build_objective(recipe.objectives[name]) for name in stage.objectives})
    if data.reads("rollouts"):
        data.plan = next(o.rollout_plan() for o in data.objectives.values() if o.source == "rollouts")
        _prepare_prompts(recipe, index, tokenizer, world, data)
    if data.reads("demos"):
        check_batch_world(stage.train, world, f"stages.{index}.train", recipe.source)
        demo_cfg = stage.demo_data or stage.data
        key = f"{where}.{'demo_data' if stage.demo_data is not None else 'data'}"
        rows, columns = load_rows(demo_cfg, key)
        data.demos, stats = tokenize_demos(to_examples(rows, columns, demo_cfg, key), tokenizer, demo_cfg, key)
        data.stats |= _demo_stats(stats, "" if data.prompts is None else "demos/")
        _check_demo_split(recipe, index, world, data)
    if stage.mixer.needs_validation():
        if stage.eval.data is None:
            raise ConfigError(f"{where}.eval.data: mixer {stage.mixer.name!r} measures a meta-gradient on held-out "
                              "demonstrations; give the stage eval data with completions")
        rows, columns = load_rows(stage.eval.data, f"{where}.eval.data")
        data.validation, _ = tokenize_demos(to_examples(rows, columns, stage.eval.data, f"{where}.eval.data"),
                                            tokenizer, stage.eval.data, f"{where}.eval.data")
    return data


def check_batch_world(train, world: int, where: str, source: str) -> None:
    """A stage's global batch of demonstrations splits evenly over the processes."""
    if train.batch_size % world:
        raise ConfigError(f"{source}: {where}.batch_size ({train.batch_size}) must be a multiple of the number of "
                          f"processes ({world})")


def _prepare_prompts(recipe, index: int, tokenizer, world: int, data: StageData) -> None:
    stage, where = recipe.stages[index], f"{recipe.source}: stages.{index}"
    check_world(stage.rollout, world, f"stages.{index}.rollout", recipe.source)
    if data.plan.prefixes and data.plan.prefixes.prefixed > stage.rollout.sampling.n:
        raise ConfigError(f"{where}.rollout.sampling.n ({stage.rollout.sampling.n}) must be at least the objective's "
                          f"prefixed rollouts per prompt ({data.plan.prefixes.prefixed})")
    rows, columns = load_rows(stage.data, f"{where}.data")
    examples = to_examples(rows, columns, stage.data, f"{where}.data")
    if data.plan.reads_demos and all(ex.completion is None for ex in examples):
        raise ConfigError(f"{where}.data.columns.completion: the stage's rollout objective puts demonstrations into "
                          f"its groups, but {stage.data.source!r} maps no demonstration column; map the role "
                          f"'completion' to one (its columns: {', '.join(sorted(rows[0]))})")
    prompts, dropped = rollout_prompts(examples, tokenizer, stage.data, demos=data.plan.reads_demos)
    require_prompts(len(prompts), stage.data, f"{where}.data")
    if data.plan.reads_demos:
        check_demonstrations(prompts, data.plan, stage.rollout, f"stages.{index}.data", recipe.source,
                             columns.get("completion", "completion"))
    data.prompts, data.stats = prompts, {"prompts": len(prompts), "dropped_overlong": dropped}


def _check_demo_split(recipe, index: int, world: int, data: StageData) -> None:
    """In a stage that also reads rollouts, each process's demonstrations split evenly into the rollout batch's
    mini-batches (so the global split is the same for any number of processes)."""
    stage = recipe.stages[index]
    if data.prompts is None:
        return
    k = stage.rollout.completions_per_step // (stage.rollout.mini_batch_size or stage.rollout.completions_per_step)
    if (stage.train.batch_size // world) % k:
        raise ConfigError(f"{recipe.source}: stages.{index}.train.batch_size ({stage.train.batch_size} demonstrations "
                          f"per step) must give each of the {world} processes a multiple of the {k} mini-batches of a "
                          "rollout batch (rollout.mini_batch_size)")


def _demo_stats(stats: TokenStats, prefix: str) -> dict:
    return {f"{prefix}examples": stats.kept, f"{prefix}truncated": stats.truncated,
            f"{prefix}dropped_overlong": stats.dropped_overlong}
