"""The `posttrain` command: train, tiny-model, config show, eval, rewards check, report, list."""
from __future__ import annotations

import argparse
import json
import os
import sys

import yaml

from posttrain.configlib import ConfigError

EPILOG_OVERRIDES = "Overrides are dotted key=value pairs, e.g. optim.lr=1e-5 stages.0.train.steps=20"


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return args.func(args) or 0
    except Exception as e:  # noqa: BLE001  (reported once, as one line; the traceback with --debug)
        code = report_failure(e, args.debug)
        if _process()[1] > 1:      # one of several processes: exit now, so that no teardown waits on the others
            sys.stderr.flush()     # (their next collective then fails at once instead of waiting for its timeout)
            sys.stdout.flush()
            os._exit(code)
        return code


def report_failure(e: Exception, debug: bool) -> int:
    """Print why the command stopped, once, and return the exit code: 2 for bad input, else 1.

    Bad input (ConfigError, a missing file) is printed as is, by one process per machine (every process of a launch
    validates the same input). Any other error is printed by the process it happened on, naming its rank when there
    are several, with where it was raised; a process whose collective failed because another process died prints
    only that it stopped (the other process prints the cause).
    """
    import traceback

    from posttrain.report import ReportError

    rank, world, local_rank = _process()
    who = f"rank {rank} of {world}: " if world > 1 else ""
    bad_input = isinstance(e, (ConfigError, FileNotFoundError, ReportError))
    if debug:
        traceback.print_exception(e, file=sys.stderr)
    if bad_input:
        if local_rank == 0 or debug:
            print(f"posttrain: error: {e}", file=sys.stderr)
        return 2
    if world > 1 and _lost_peer(e):
        print(f"posttrain: {who}stopped: another process stopped (its error is printed above), so a collective "
              "operation failed" + ("" if debug else " (--debug prints the traceback)"), file=sys.stderr)
        return 1
    print(f"posttrain: error: {who}{_describe(e, debug)}", file=sys.stderr)
    return 1


def _describe(e: Exception, debug: bool) -> str:
    """The error as one line: posttrain's own named errors as they are; others with their type, where they were
    raised and how to see the traceback."""
    import traceback

    from posttrain.checkpoint import CheckpointError
    from posttrain.rewarding import RewardError
    from posttrain.trainer import NonFiniteError

    if isinstance(e, (CheckpointError, RewardError, NonFiniteError)):   # they name the step / file / function
        return str(e)
    frames = traceback.extract_tb(e.__traceback__)
    where = f" (at {frames[-1].filename}:{frames[-1].lineno} in {frames[-1].name})" if frames else ""
    return f"{type(e).__name__}: {e}{where}" + ("" if debug else " (--debug prints the traceback)")


def _lost_peer(e: BaseException) -> bool:
    """Whether `e` (or what caused it) is a collective that failed because a peer process went away."""
    import torch.distributed as dist

    while e is not None:
        text = str(e)
        if isinstance(e, dist.DistError) or "gloo" in text.lower() or "connection closed by peer" in text.lower():
            return True
        e = e.__cause__ or e.__context__
    return False


def _process() -> tuple[int, int, int]:
    """(rank, world size, local rank) of this process, as the launcher (torchrun / accelerate launch) set them."""
    env = os.environ
    return int(env.get("RANK", "0")), int(env.get("WORLD_SIZE", "1")), int(env.get("LOCAL_RANK", env.get("RANK", "0")))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="posttrain",
                                description="LLM post-training: SFT, RL with verifiable rewards, and hybrids.")
    p.set_defaults(debug=False)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", help="print the full traceback of an error")
    sub = p.add_subparsers(title="commands", metavar="COMMAND", parser_class=_with_parents(common))

    t = sub.add_parser("train", help="train a recipe", description="Run a recipe's stages.", epilog=EPILOG_OVERRIDES)
    t.add_argument("recipe", help="path to a recipe YAML")
    t.add_argument("overrides", nargs="*", help="dotted key=value overrides")
    t.add_argument("--resume", metavar="CKPT",
                   help="continue from a checkpoint directory, or 'auto' for the run's newest")
    t.set_defaults(func=cmd_train)

    m = sub.add_parser("tiny-model", help="build the embedded tiny Qwen2 model", description="Build the embedded tiny "
                       "Qwen2-architecture model and tokenizer into OUT_DIR (loadable by plain transformers).")
    m.add_argument("out_dir")
    m.add_argument("overrides", nargs="*",
                   help="size settings, e.g. hidden_size=256 num_layers=4 corpus=task:arithmetic seed=1")
    m.set_defaults(func=cmd_tiny_model)

    c = sub.add_parser("config", help="inspect recipes", description="Inspect recipes.")
    csub = c.add_subparsers(title="config commands", metavar="COMMAND")
    show = csub.add_parser("show", help="print the resolved recipe, or the reference of every recipe key",
                           description="Print the recipe after overrides, validation and defaults; or, with --doc, "
                           "every key a recipe may hold (type, default, help), or those under SECTION.",
                           epilog=EPILOG_OVERRIDES + ". Reference: posttrain config show --doc "
                           "[optim | rollout.sampling | objectives.grpo | ...]")
    show.add_argument("recipe", nargs="?", help="a recipe YAML (not needed with --doc)")
    show.add_argument("overrides", nargs="*")
    show.add_argument("--doc", nargs="?", const="", metavar="SECTION", help="print the reference of every recipe key "
                      "(or of SECTION: a top-level key or dotted prefix) instead of a recipe")
    show.set_defaults(func=cmd_config_show)

    e = sub.add_parser("eval", help="greedy accuracy of a model with a verifier",
                       description="Greedy accuracy of MODEL on DATA (task:<name>, a file, or a hub data set), "
                       "verified by a reward.", epilog="Settings: reward=exact num_samples=200 max_new_tokens=64 "
                       "batch_size=64 threshold=1.0 data.split=test data.task.digits=3 "
                       "data.columns.prompt=question ...")
    e.add_argument("model", help="model directory or hub name")
    e.add_argument("data", help="task:<name>, a data file, or a hub data set")
    e.add_argument("overrides", nargs="*", help="dotted key=value eval settings")
    e.add_argument("--output", help="write every prompt, completion and verdict to this JSONL file")
    e.set_defaults(func=cmd_eval)

    _add_rewards_and_report(sub)

    ls = sub.add_parser("list", help="list registered components", description="Registered objectives, "
                        "aggregations, rewards, rollout engines and tasks.")
    ls.set_defaults(func=cmd_list)
    return p


def _add_rewards_and_report(sub) -> None:
    """The `rewards check` and `report` commands."""
    r = sub.add_parser("rewards", help="inspect reward functions", description="Inspect reward functions.")
    rsub = r.add_subparsers(title="rewards commands", metavar="COMMAND")
    chk = rsub.add_parser("check", help="score a data set with a reward and print the distribution",
                          description="Score the completions of DATA (or, with --gold, its gold solutions) with the "
                          "reward SPEC and print the distribution: count, mean, std, histogram, abstentions, errors.",
                          epilog="Settings are dotted RewardSpec overrides written right after SPEC, e.g. "
                          "`posttrain rewards check math kwargs.gold_column=solution --data math.jsonl --gold`; "
                          "others: kwargs.tags=[think,answer] timeout=60 executor=process")
    chk.add_argument("spec", help="a registered reward (posttrain list), module:function or path/to/file.py:function")
    chk.add_argument("overrides", nargs="*", help="dotted key=value reward settings (right after SPEC)")
    chk.add_argument("--data", required=True, help="a .jsonl/.json/.parquet/.csv file, task:<name> or a hub data set")
    chk.add_argument("--column", help="column holding the completions (default: completion; with --gold: answer)")
    chk.add_argument("--gold", action="store_true", help="score the gold solutions (e.g. GSM8K's answer column) as "
                     "completions: a verifier should give them full marks")
    chk.add_argument("--split", default="train", help="split of a hub data set or synthetic task (default: train)")
    chk.add_argument("--limit", type=int, help="only the first N rows")
    chk.add_argument("--batch-size", type=int, default=64, help="completions per reward call (default: 64)")
    chk.add_argument("--json", action="store_true", help="print the summary as JSON")
    chk.set_defaults(func=cmd_rewards_check)

    rep = sub.add_parser("report", help="plots and a summary of runs from their metrics.jsonl",
                         description="Write one PNG per group of metrics (loss, optimizer, throughput, reward, KL and "
                         "entropy, clipping, completion length, objective mix, evaluation, time) with every run "
                         "overlaid, and report.md: final and best held-out accuracy, wall time per stage, the time "
                         "split of an RL step.")
    rep.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run directories (holding metrics.jsonl)")
    rep.add_argument("--out", metavar="DIR", help="where to write (default: RUN_DIR/report for one run, ./report for "
                     "several)")
    rep.set_defaults(func=cmd_report)


def _with_parents(common: argparse.ArgumentParser):
    """Sub-command parsers that all take the options of `common` (e.g. `posttrain train RECIPE --debug`)."""

    class Parser(argparse.ArgumentParser):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, parents=[common, *kwargs.pop("parents", [])], **kwargs)

    return Parser


def cmd_train(args) -> int:
    from posttrain.config import load_recipe
    from posttrain.preflight import preflight, record_recipe
    from posttrain.trainer import train

    recipe = load_recipe(args.recipe, args.overrides)
    rank, world, _ = _process()
    # before any weights load or file is written
    resume_from, data = preflight(recipe, args.resume, world, report=rank == 0)
    if rank == 0:
        record_recipe(recipe)
    results = train(recipe, resume=str(resume_from) if resume_from else None, data=data)
    if rank == 0:                                   # one summary line, not one per process
        shown = {k: round(v, 4) if isinstance(v, float) else v for k, v in results.items()
                 if k.startswith(("eval/", "loss"))}
        print(f"done: {json.dumps(shown)}; final model in {recipe.output_dir}/final; metrics in "
              f"{recipe.output_dir}/metrics.jsonl")
    return 0


def cmd_tiny_model(args) -> int:
    from posttrain.configlib import apply_overrides, build
    from posttrain.tiny import TinyModelConfig, build_tiny_model

    cfg = build(TinyModelConfig, apply_overrides({}, args.overrides), "", "tiny-model")
    out = build_tiny_model(args.out_dir, cfg)
    print(f"tiny model written to {out}")
    return 0


def cmd_config_show(args) -> int:
    from posttrain.config import resolved_dict

    if args.doc is not None:
        from posttrain.configdoc import recipe_doc

        section = args.doc or ""
        if args.recipe is not None and not section:       # `config show --doc optim` parses optim as the recipe
            section, args.recipe = args.recipe, None
        if args.recipe is not None or args.overrides:
            raise ConfigError("--doc takes one SECTION and no recipe or overrides")
        print(recipe_doc(section), end="")
        return 0
    if args.recipe is None:
        raise ConfigError("config show: give a RECIPE (or --doc for the reference of every key)")

    print(yaml.safe_dump(resolved_dict(args.recipe, args.overrides), sort_keys=False), end="")
    return 0


def cmd_eval(args) -> int:
    from posttrain.config import EvalConfig
    from posttrain.configlib import apply_overrides, build
    from posttrain.evaluation import greedy_verdicts, held_out_examples
    from posttrain.models import ModelConfig, check_model_dir, load_model, load_tokenizer

    raw = apply_overrides({"data": {"source": args.data, "split": "test"}}, args.overrides, "eval")
    cfg = build(EvalConfig, raw, "", "eval")
    model_cfg = ModelConfig(path=args.model)
    check_model_dir(args.model, "MODEL")
    tokenizer, model = load_tokenizer(args.model, model_cfg, {"data": cfg.data}), load_model(args.model, model_cfg)
    examples = held_out_examples(cfg, "data")
    completions, correct = greedy_verdicts(model, tokenizer, cfg, examples)
    if args.output:
        with open(args.output, "w") as f:
            for ex, c, ok in zip(examples, completions, correct):
                f.write(json.dumps({"prompt": ex.prompt, "completion": c, "correct": ok}) + "\n")
    print(json.dumps({"eval/accuracy": sum(correct) / len(correct), "eval/num_samples": len(correct)}))
    return 0


def cmd_rewards_check(args) -> int:
    from posttrain.configlib import apply_overrides, build
    from posttrain.data import DataConfig, load_rows
    from posttrain.rewarding import RewardSpec, check_reward, format_summary

    spec = build(RewardSpec, apply_overrides({"name": args.spec}, args.overrides), "", "command line")
    rows, roles = load_rows(DataConfig(source=args.data, split=args.split, limit=args.limit), "--data")
    column = args.column or ("answer" if args.gold else "completion")
    if column not in rows[0]:
        raise ConfigError(f"--column: {args.data!r} has no column {column!r}; its columns: "
                          f"{', '.join(sorted(rows[0]))}")
    prompt_col = roles.get("prompt") or next((c for c in ("prompt", "question") if c in rows[0]), None)
    prompts = [row.get(prompt_col, "") if prompt_col else "" for row in rows]
    columns = {k: [row.get(k) for row in rows] for k in rows[0] if k != "prompt"}
    summary = check_reward(spec, prompts, [row[column] for row in rows], columns, args.batch_size)
    print(json.dumps(summary) if args.json else format_summary(summary))
    return 0


def cmd_report(args) -> int:
    from pathlib import Path

    from posttrain.report import write_report

    out = Path(args.out or (Path(args.run_dirs[0]) / "report" if len(args.run_dirs) == 1 else "report"))
    shown = write_report(args.run_dirs, out)
    print(f"report: {len(shown)} figures ({', '.join(shown)}) and report.md in {out}")
    return 0


def cmd_list(args) -> int:
    from posttrain import rewards
    from posttrain.mixers import MIXERS
    from posttrain.objectives import AGGREGATIONS, OBJECTIVES
    from posttrain.schedules import SCHEDULES
    from posttrain.tasks import TASKS

    sections = {"objectives": OBJECTIVES.names(), "aggregations": AGGREGATIONS.names(), "mixers": MIXERS.names(),
                "schedules": SCHEDULES.names(), "rewards": rewards.REWARDS.names(),
                "rollout engines": _rollout_engines(), "tasks": TASKS.names()}
    for heading, names in sections.items():
        print(f"{heading}:")
        for name in names:
            print(f"  {name}")
    return 0


def _rollout_engines() -> list[str]:
    try:
        from posttrain.rollout import ENGINES
    except ImportError:
        return []
    return ENGINES.names()


if __name__ == "__main__":
    sys.exit(main())
