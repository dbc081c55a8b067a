"""Wall time per optimizer step of SFT, DFT, ASFT and OTR on the tiny model, and the greedy accuracy each reaches.

    python benchmarks/objectives_step_time.py                       # timing only (a few minutes)
    python benchmarks/objectives_step_time.py --accuracy            # + a same-budget training run per objective
    python benchmarks/objectives_step_time.py --no-timing --accuracy --warmup-steps 600 --set data.task.ops=+ \
        --set eval.data.task.ops=+                                  # a longer warm-up on addition only

Timing: one Trainer per objective (recipes/tiny/<method>.yaml, method stage only, same initial weights, batch 64),
stepped round-robin -- SFT, DFT, ASFT, OTR, SFT, ... -- so that load from other processes falls on all of them
alike; each objective's time is the median of its per-step times (`Trainer.train_step`: data, reference forward for
ASFT, forward, loss, backward, clip, AdamW). Repeated `--rounds` times; the report gives each round's median ratio
to SFT and the median over rounds. Check `uptime` first: on a shared 2-core machine the numbers are noisy.

Accuracy: each method from the same SFT warm-up (stage 0 of the tiny recipes), then `--method-steps` steps of the
method (SFT continues with SFT), greedy accuracy on 500 held-out problems at the end.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
METHODS = ["sft", "dft", "asft", "otr"]


def recipe_for(method: str, out_dir: Path, extra: list[str]):
    from posttrain.config import load_recipe

    base = "dft" if method == "sft" else method
    overrides = [f"output_dir={out_dir / method}", "logging.report_to=[]", "logging.progress_bar=false"]
    if method == "sft":
        overrides += ["stages.1.name=sft", "stages.1.objectives={sft: 1.0}"]
    return load_recipe(REPO / "recipes" / "tiny" / f"{base}.yaml", overrides + extra)


def timing(args, out_dir: Path) -> dict:
    from posttrain.config import Recipe
    from posttrain.trainer import Trainer

    runs = {}
    for m in METHODS:
        r = recipe_for(m, out_dir, ([f"objectives.otr.num_samples={args.k}"] if m == "otr" else []) + args.set)
        r = Recipe(r.output_dir, r.seed, r.model, r.objectives, [r.stages[1]], r.logging, r.source)  # method only
        trainer = Trainer(r)
        runs[m] = (trainer, trainer.setup_stage(0))
    rounds = []
    for _ in range(args.rounds):
        times = {m: [] for m in METHODS}
        for step in range(args.warmup + args.steps):
            for m in METHODS:
                trainer, run = runs[m]
                trainer.state.step = step
                t0 = time.perf_counter()
                trainer.train_step(run)
                if step >= args.warmup:
                    times[m].append(time.perf_counter() - t0)
        med = {m: statistics.median(v) for m, v in times.items()}
        rounds.append({"median_s": med, "ratio_to_sft": {m: med[m] / med["sft"] for m in METHODS}})
        print(json.dumps(rounds[-1]), flush=True)
    return {"rounds": rounds, "median_ratio": {m: statistics.median(r["ratio_to_sft"][m] for r in rounds)
                                              for m in METHODS},
            "median_step_s": {m: statistics.median(r["median_s"][m] for r in rounds) for m in METHODS}}


def accuracy(args, out_dir: Path) -> dict:
    from posttrain.trainer import train

    result = {}
    for m in METHODS:
        extra = [f"stages.0.train.steps={args.warmup_steps}", f"stages.1.train.steps={args.method_steps}", *args.set]
        t0 = time.perf_counter()
        metrics = train(recipe_for(m, out_dir / "acc", extra))
        result[m] = {"accuracy": metrics.get("eval/accuracy"), "seconds": time.perf_counter() - t0}
        print(m, json.dumps(result[m]), flush=True)
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=20, help="timed steps per objective per round")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per objective per round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--k", type=int, default=64, help="OTR samples per position")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 = least disturbed by other processes)")
    p.add_argument("--accuracy", action="store_true", help="also train each method and report greedy accuracy")
    p.add_argument("--warmup-steps", type=int, default=200, help="SFT warm-up steps before each method")
    p.add_argument("--method-steps", type=int, default=400, help="steps of the method after the warm-up")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="recipe override for the timing and accuracy runs, e.g. --set model.tiny.hidden_size=256 "
                        "(repeatable)")
    p.add_argument("--no-timing", action="store_true", help="skip the step-time rounds")
    p.add_argument("--out", default=None, help="run directory (default: a temporary one)")
    args = p.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch

    torch.set_num_threads(args.threads)
    out_dir = Path(args.out or tempfile.mkdtemp(prefix="objectives-bench-"))
    report = {"load_before": os.getloadavg()}
    if not args.no_timing:
        report["timing"] = timing(args, out_dir)
    if args.accuracy:
        report["accuracy"] = accuracy(args, out_dir)
    report["load_after"] = os.getloadavg()
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
