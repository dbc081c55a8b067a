"""Preflight: what `posttrain train` checks before it loads a model's weights or writes anything.

    output_dir    not a file; not already holding a run unless resumed
    --resume      the checkpoint is complete and intact (checkpoint.resolve); the run was started with the same recipe
                  (RUN_DIR/recipe.yaml, written when a run starts; keys that change no computation may differ)
    model         a model directory (config.json and weights) or a hub name; its config and tokenizer load, and the
                  tokenizer has a chat template
    every stage   its data loads, maps its columns and tokenizes (demonstrations) or has prompts that fit in
                  max_length (rollouts); its batches split evenly over the processes; its rewards load, get every
                  argument they require and accept the data (their data checks); its rollout engine is installed;
                  its held-out data and verifier load
Each check is the one the trainer itself runs (data.py, models.py, rewarding.py, sources/prepare.py, checkpoint.py),
called here first and in this order, with the recipe file named in every message. Only the embedded tiny model is
built (into the shared `.posttrain-cache` beside the run directory, as the trainer does); nothing is written to the
run directory.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

import yaml

from posttrain import checkpoint as ckpt
from posttrain.config import Recipe, StageConfig, recipe_dict
from posttrain.configlib import ConfigError
from posttrain.data import row_name
from posttrain.evaluation import held_out_examples
from posttrain.models import load_config, load_tokenizer, resolve_model_path
from posttrain.rewarding import check_reward_inputs, load_rewards
from posttrain.rollout import ENGINE_REQUIREMENTS
from posttrain.sources.prepare import StageData, prepare_stage

RECIPE_FILE = "recipe.yaml"
# Keys of a recipe that may differ on --resume: where the run writes and what it reports, never what it computes.
MAY_DIFFER_ON_RESUME = re.compile(r"output_dir|logging\..*|stages\.\d+\.eval\..*"
                                  r"|stages\.\d+\.train\.(log_every|eval_every|save_every|keep_checkpoints|max_minutes)")


def preflight(recipe: Recipe, resume: str | None, world: int, report: bool = True) -> tuple[Path | None, list]:
    """Run every check (ConfigError on the first failure) -> the checkpoint to resume from (or None) and every stage's
    prepared data (sources/prepare.py StageData, for the Trainer). `world` is the number of processes of the launch;
    `report`: this process may print (`--resume auto`'s fallback note)."""
    run_dir = Path(recipe.output_dir)
    check_output_dir(recipe, resume)
    resume_from = ckpt.resolve(run_dir, resume, report=report) if resume else None
    if resume_from is not None:
        check_same_recipe(recipe, resume_from)
    tokenizer = check_model(recipe)
    return resume_from, [check_stage(recipe, index, stage, tokenizer, world)
                         for index, stage in enumerate(recipe.stages)]


def check_output_dir(recipe: Recipe, resume: str | None) -> None:
    out, source = Path(recipe.output_dir), recipe.source
    existing = next(p for p in (out, *out.parents) if p.exists())
    if not existing.is_dir():
        raise ConfigError(f"{source}: output_dir: {str(existing)!r} is a file; expected a directory (the run writes "
                          "metrics.jsonl, checkpoints/ and final/ there)")
    held = [p.name for p in ckpt.list_checkpoints(out)] + \
        (["metrics.jsonl"] if (out / "metrics.jsonl").is_file() and (out / "metrics.jsonl").stat().st_size else [])
    if held and not resume:
        raise ConfigError(f"{source}: output_dir: {str(out)!r} already holds a run ({', '.join(held[-3:])}); continue "
                          "it with --resume auto, or give another output_dir (or delete that one)")


def record_recipe(recipe: Recipe) -> None:
    """Write RUN_DIR/recipe.yaml, the resolved recipe a resume is checked against (one process per launch)."""
    run_dir = Path(recipe.output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    tmp = run_dir / f".{RECIPE_FILE}.{os.getpid()}"
    tmp.write_text(f"# the resolved recipe of this run ({recipe.source}); `--resume` is checked against it\n"
                   + yaml.safe_dump(recipe_dict(recipe), sort_keys=False))
    tmp.replace(run_dir / RECIPE_FILE)


def check_same_recipe(recipe: Recipe, checkpoint: Path) -> None:
    """The checkpoint's run was started with this recipe, up to the keys in MAY_DIFFER_ON_RESUME."""
    stored = Path(checkpoint).resolve().parent.parent / RECIPE_FILE
    if not stored.is_file():
        return                                     # a run from before recipes were recorded: nothing to compare
    then, now = _flat(yaml.safe_load(stored.read_text())), _flat(recipe_dict(recipe))
    missing = object()
    differ = [k for k in sorted(set(then) | set(now), key=_natural)
              if then.get(k, missing) != now.get(k, missing) and not MAY_DIFFER_ON_RESUME.fullmatch(k)]
    if differ:
        shown = "; ".join(f"{k}: {_shown(then, k)} in the run, {_shown(now, k)} now" for k in differ[:6])
        more = f" (and {len(differ) - 6} more)" if len(differ) > 6 else ""
        raise ConfigError(f"{recipe.source}: --resume {checkpoint}: the run was started with a different recipe "
                          f"({stored}): {shown}{more}. Resume with the recipe it was started with, or start a new run "
                          "in another output_dir")


def check_model(recipe: Recipe):
    """The model's path, config and tokenizer (with a chat template); returns the tokenizer. No weights are loaded."""
    cfg = recipe.model
    try:
        path = resolve_model_path(cfg, Path(recipe.output_dir).parent / ".posttrain-cache")
        load_config(path, cfg)
        return load_tokenizer(path, cfg, recipe.data_sections())
    except ConfigError as e:
        raise ConfigError(f"{recipe.source}: {e}") from None


def check_stage(recipe: Recipe, index: int, stage: StageConfig, tokenizer, world: int) -> StageData:
    """The stage's data and batch split (sources/prepare.py, the trainer's own preparation, returned for it to
    reuse), its rewards and engine, and its evaluation (see the module docstring)."""
    where = f"{recipe.source}: stages.{index}"
    data = prepare_stage(recipe, index, tokenizer, world)
    if data.prompts is not None:
        check_engine(stage.rollout.engine, f"{where}.rollout.engine")
        columns = {k: [p.columns.get(k) for p in data.prompts] for k in data.prompts[0].columns}
        for j, reward in enumerate(load_rewards(stage.rewards, f"stages.{index}.rewards", recipe.source)):
            check_reward_inputs(reward.fn, reward.spec.name, reward.spec.kwargs, columns,
                                ("prompts", "completions", "completion_ids"), f"{where}.rewards.{j}",
                                lambda i: f"{stage.data.source!r} {row_name(stage.data, data.prompts[i].row)}")
    if stage.eval.data is not None:
        check_eval(stage, f"{where}.eval")
    return data


def check_eval(stage: StageConfig, where: str) -> None:
    """The held-out data loads and its verifier reward loads and accepts it (as evaluation.score calls it)."""
    from posttrain import rewards

    examples = held_out_examples(stage.eval, f"{where}.data")
    try:
        fn = rewards.get(stage.eval.reward)
    except (KeyError, ImportError, AttributeError, FileNotFoundError) as e:
        raise ConfigError(f"{where}.reward: {e.args[0] if e.args else e}") from None
    data = {k: [ex.columns.get(k) for ex in examples] for k in examples[0].columns}
    check_reward_inputs(fn, stage.eval.reward, {}, data, ("prompts", "completions"), f"{where}.reward",
                        lambda i: f"{stage.eval.data.source!r} {row_name(stage.eval.data, i)}")


def check_engine(engine: str, where: str) -> None:
    """What the rollout engine needs beyond posttrain's own dependencies is installed (e.g. vLLM)."""
    requirement = ENGINE_REQUIREMENTS.get(engine)
    if requirement is None:
        return
    try:
        requirement(engine)
    except ImportError as e:
        raise ConfigError(f"{where}: {e}") from None


def _flat(data, prefix: str = "") -> dict:
    """Nested mappings and lists as {dotted key: leaf value}."""
    if isinstance(data, dict):
        items = data.items()
    elif isinstance(data, list) and data and all(isinstance(v, (dict, list)) for v in data):
        items = enumerate(data)
    else:
        return {prefix: data}
    out = {}
    for k, v in items:
        out |= _flat(v, f"{prefix}.{k}" if prefix else str(k))
    return out


def _natural(key: str) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", key)]


def _shown(flat: dict, key: str) -> str:
    return repr(flat[key]) if key in flat else "(absent)"
