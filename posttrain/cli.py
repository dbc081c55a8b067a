"""The `posttrain` command: train, tiny-model, config show, eval, rewards check, list."""
from __future__ import annotations

import argparse
import json
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
    except (ConfigError, FileNotFoundError) as e:  # the user's input is wrong: say what, where; no traceback
        print(f"posttrain: error: {e}", file=sys.stderr)
        return 2


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="posttrain", description="LLM post-training: SFT, RL with verifiable rewards, and hybrids.")
    sub = p.add_subparsers(title="commands", metavar="COMMAND")

    t = sub.add_parser("train", help="train a recipe", description="Run a recipe's stages.", epilog=EPILOG_OVERRIDES)
    t.add_argument("recipe", help="path to a recipe YAML")
    t.add_argument("overrides", nargs="*", help="dotted key=value overrides")
    t.add_argument("--resume", metavar="CKPT", help="continue from a checkpoint directory, or 'auto' for the run's newest")
    t.set_defaults(func=cmd_train)

    m = sub.add_parser("tiny-model", help="build the embedded tiny Qwen2 model", description="Build the embedded tiny "
                       "Qwen2-architecture model and tokenizer into OUT_DIR (loadable by plain transformers).")
    m.add_argument("out_dir")
    m.add_argument("overrides", nargs="*", help="size settings, e.g. hidden_size=256 num_layers=4 corpus=task:arithmetic seed=1")
    m.set_defaults(func=cmd_tiny_model)

    c = sub.add_parser("config", help="inspect recipes", description="Inspect recipes.")
    csub = c.add_subparsers(title="config commands", metavar="COMMAND")
    show = csub.add_parser("show", help="print the resolved recipe", description="Print the recipe after overrides, "
                           "validation and defaults.", epilog=EPILOG_OVERRIDES)
    show.add_argument("recipe")
    show.add_argument("overrides", nargs="*")
    show.set_defaults(func=cmd_config_show)

    e = sub.add_parser("eval", help="greedy accuracy of a model with a verifier",
                       description="Greedy accuracy of MODEL on DATA (task:<name>, a file, or a hub data set), "
                       "verified by a reward.", epilog="Settings: reward=exact num_samples=200 max_new_tokens=64 "
                       "batch_size=64 threshold=1.0 data.split=test data.task.digits=3 data.columns.prompt=question ...")
    e.add_argument("model", help="model directory or hub name")
    e.add_argument("data", help="task:<name>, a data file, or a hub data set")
    e.add_argument("overrides", nargs="*", help="dotted key=value eval settings")
    e.add_argument("--output", help="write every prompt, completion and verdict to this JSONL file")
    e.set_defaults(func=cmd_eval)

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

    ls = sub.add_parser("list", help="list registered components", description="Registered objectives, "
                        "aggregations, rewards, rollout engines and tasks.")
    ls.set_defaults(func=cmd_list)
    return p


def cmd_train(args) -> int:
    from posttrain.config import load_recipe
    from posttrain.trainer import train

    recipe = load_recipe(args.recipe, args.overrides)
    results = train(recipe, resume=args.resume)
    shown = {k: round(v, 4) if isinstance(v, float) else v for k, v in results.items() if k.startswith(("eval/", "loss"))}
    print(f"done: {json.dumps(shown)}; final model in {recipe.output_dir}/final; metrics in {recipe.output_dir}/metrics.jsonl")
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

    print(yaml.safe_dump(resolved_dict(args.recipe, args.overrides), sort_keys=False), end="")
    return 0


def cmd_eval(args) -> int:
    from posttrain.config import EvalConfig
    from posttrain.configlib import apply_overrides, build
    from posttrain.evaluation import greedy_verdicts, held_out_examples
    from posttrain.models import ModelConfig, load_model, load_tokenizer

    raw = apply_overrides({"data": {"source": args.data, "split": "test"}}, args.overrides, "eval")
    cfg = build(EvalConfig, raw, "", "eval")
    model_cfg = ModelConfig(path=args.model)
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
        raise ConfigError(f"--column: {args.data!r} has no column {column!r}; its columns: {', '.join(sorted(rows[0]))}")
    prompt_col = roles.get("prompt") or next((c for c in ("prompt", "question") if c in rows[0]), None)
    prompts = [row.get(prompt_col, "") if prompt_col else "" for row in rows]
    columns = {k: [row.get(k) for row in rows] for k in rows[0] if k != "prompt"}
    summary = check_reward(spec, prompts, [row[column] for row in rows], columns, args.batch_size)
    print(json.dumps(summary) if args.json else format_summary(summary))
    return 0


def cmd_list(args) -> int:
    import rewards
    from posttrain.objectives import AGGREGATIONS, OBJECTIVES
    from posttrain.tasks import TASKS

    sections = {"objectives": OBJECTIVES.names(), "aggregations": AGGREGATIONS.names(),
                "rewards": rewards.REWARDS.names(), "rollout engines": _rollout_engines(), "tasks": TASKS.names()}
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
