"""GRPO, Dr. GRPO, DAPO and PPO (ReFT) from one SFT checkpoint with the same wall-clock budget each: greedy accuracy
before and after, the sampled reward at the start and the end, and seconds per step split into generate / reward /
train (and sync).

    python benchmarks/rl_methods.py CKPT [--minutes 3] [--lr 3e-4] [--reward steps] [--num-ops 3]
                                         [--methods grpo,dr_grpo,dapo,ppo_reft,sft]

CKPT: a transformers checkpoint of the tiny model, e.g. one SFT'd at a *constant* learning rate on 3-step chains:
`posttrain train recipes/quickstart.yaml 'stages=[{name: sft, objectives: {sft: 1.0}, train: {steps: 400}}]'`
(~41% with the `steps` reward). Each method runs the RL stage of recipes/tiny/<method>.yaml (its objective and
rollout settings) on the arithmetic task with `num_ops` operations, from CKPT, at a constant learning rate `--lr`
for `--minutes` of wall time (`train.max_minutes`), then evaluates greedily on 500 held-out problems.
`--reward steps` (default) trains every method on the `steps` verifier (DAPO adds its soft overlong punishment) and
evaluates with it; `--reward recipe` keeps each recipe's own rewards and evaluates with `exact`. `sft` continues
supervised training on the same task with the same lr and budget, as the reference point.
Check `uptime` first: the budget is wall time, so other load on the machine shortens every run alike.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
PHASES = ["time/generate", "time/reward", "time/logprobs", "time/train", "time/sync", "time/step"]


def method_recipe(method: str, ckpt: str, out: Path, args):
    from posttrain.config import load_recipe

    task = {"digits": 1, "num_ops": args.num_ops, "ops": "+-"}
    base = "grpo" if method == "sft" else method
    reward = "exact" if args.reward == "recipe" else args.reward
    overrides = [
        f"output_dir={out / method}", f"model.path={ckpt}", "logging.report_to=[]", "logging.progress_bar=false",
        f"data.task={json.dumps(task | {'num_examples': 20000})}",
        f"eval.data.task={json.dumps(task | {'num_examples': 500})}", "eval.max_new_tokens=32",
        f"eval.reward={reward}",
        "rollout.sampling.max_new_tokens=32", "stages=[]",
    ]
    if method == "dapo":    # the soft overlong punishment scaled to the 32-token budget: 0 up to 28 tokens, -1 at 32
        overlong = "{name: overlong, kwargs: {max_length: 32, cache_length: 4}}"
        overrides.insert(0, f"rewards=[{{name: {reward}}}, {overlong}]")
    elif args.reward != "recipe":
        overrides.insert(0, f"rewards=[{{name: {reward}}}]")
    recipe = load_recipe(REPO / "recipes/tiny" / f"{base}.yaml", overrides[:-1])
    rl = recipe.stages[1]
    name, objective = ("sft", "sft") if method == "sft" else (rl.name, next(iter(rl.objectives)))
    stage = {"name": name, "objectives": {objective: 1.0},
             "train": {"steps": 100000, "max_minutes": args.minutes, "log_every": 1,
                       "micro_batch_size": rl.train.micro_batch_size, "batch_size": 64},
             "optim": {"lr": args.lr}, "schedule": {"name": "constant", "warmup_steps": 0}}
    return load_recipe(REPO / "recipes/tiny" / f"{base}.yaml", overrides[:-1] + [f"stages={json.dumps([stage])}"])


def accuracy(ckpt: str, num_ops: int, reward: str) -> float:
    import subprocess

    out = subprocess.run([sys.executable, "-m", "posttrain.cli", "eval", ckpt, "task:arithmetic", "num_samples=500",
                          "max_new_tokens=32", "data.task.digits=1", f"data.task.num_ops={num_ops}",
                          "data.task.ops=+-", f"reward={'exact' if reward == 'recipe' else reward}"],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["eval/accuracy"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("ckpt")
    p.add_argument("--minutes", type=float, default=3.0)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--reward", default="steps", help="a reward name for every method, or 'recipe'")
    p.add_argument("--num-ops", type=int, default=3)
    p.add_argument("--methods", default="grpo,dr_grpo,dapo,ppo_reft,sft")
    p.add_argument("--out", default="/tmp/rl-methods")
    args = p.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from posttrain.trainer import train

    report = {"load_before": os.getloadavg(), "ckpt": args.ckpt, "minutes": args.minutes, "lr": args.lr,
              "reward": args.reward, "accuracy_before": accuracy(args.ckpt, args.num_ops, args.reward), "methods": {}}
    print(json.dumps({"accuracy_before": report["accuracy_before"]}), flush=True)
    for method in args.methods.split(","):
        t0 = time.perf_counter()
        result = train(method_recipe(method, args.ckpt, Path(args.out), args))
        rows = [json.loads(line) for line in (Path(args.out) / method / "metrics.jsonl").read_text().splitlines()]
        rows = [r for r in rows if "loss" in r]
        rewards = [r["reward/mean"] for r in rows if "reward/mean" in r]
        k = max(1, len(rewards) // 10)
        report["methods"][method] = {
            "accuracy_after": result.get("eval/accuracy"), "steps": len(rows),
            "optimizer_steps": sum(r.get("optimizer_steps", 1) for r in rows),
            "reward_first_tenth": sum(rewards[:k]) / k if rewards else None,
            "reward_last_tenth": sum(rewards[-k:]) / k if rewards else None,
            "seconds_per_step": {ph: statistics.mean(r[ph] for r in rows) for ph in PHASES if ph in rows[0]},
            "wall_s": time.perf_counter() - t0, "load_after": os.getloadavg()}
        print(json.dumps({method: report["methods"][method]}), flush=True)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
