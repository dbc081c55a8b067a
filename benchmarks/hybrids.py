"""SFT, RL and the hybrids between them from one shared SFT warm-up, at equal compute: the comparison users can rerun.

    python benchmarks/hybrids.py [--minutes 3] [--seeds 0,1,2] [--workers 2] [--out runs/bench-hybrids]
                                 [--methods sft,grpo,luffy,prefix_rft,chord,chord_phi,uft,sasr,amft,srft,relift]

1. Warm-up (once, reused): the quickstart's SFT stage (recipes/quickstart.yaml: the embedded tiny model, hidden 128,
   300 steps on 3-step 1-digit chains at a constant lr) -> OUT/warmup/final.
2. Every method x seed, from that checkpoint, for `--minutes` of *CPU time* of its process (`train.budget_clock: cpu`,
   one thread; other load on a shared machine does not shorten a run, as it would a wall-time budget): the hybrid stage
   of recipes/tiny/<method>.yaml as shipped (its objectives, mixer, rollout settings, the `steps` verifier, lr 3e-4);
   `sft` continues the quickstart's SFT at the same lr, `grpo` runs the quickstart's GRPO stage. The recipe seed is the
   run's seed. A checkpoint every `--save-every` steps.
3. Every checkpoint: greedy accuracy on 200 held-out 3-step chains (the curve); the final model: greedy accuracy on 500
   held-out problems in distribution (3 steps, + and -) and out of it (4 steps; 3 steps with *), pass@8 (T = 1) on
   200 in-distribution problems, and the policy's mean token entropy on its own T = 1 samples.
4. OUT/runs.csv (a row per run), OUT/summary.csv (mean and min-max over seeds per method) and OUT/accuracy.png
   (in-distribution accuracy against CPU minutes, one line per method: the mean over seeds).

Runs go to `--workers` processes side by side (each one thread). Print `uptime` before and after; the CPU budget
makes the step counts comparable, wall times are reported too.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
METHODS = ["sft", "grpo", "luffy", "prefix_rft", "chord", "chord_phi", "uft", "sasr", "amft", "srft", "relift"]
TASK = {"digits": 1, "num_ops": 3, "ops": "+-"}
EVALS = {"id": TASK, "ood_long": TASK | {"num_ops": 4}, "ood_ops": TASK | {"ops": "+-*"}}


# ----------------------------------------------------------------------------------------------------- recipes
def quickstart() -> dict:
    return yaml.safe_load((REPO / "recipes/quickstart.yaml").read_text())


def warmup_recipe(out: Path) -> dict:
    raw = quickstart()
    raw |= {"output_dir": str(out / "warmup"), "logging": {"report_to": [], "progress_bar": False}}
    raw["stages"] = [raw["stages"][0] | {"train": {"steps": 300}}]
    raw["eval"]["num_samples"] = 200
    return raw


def method_recipe(method: str, seed: int, warmup: Path, out: Path, minutes: float, save_every: int) -> dict:
    """The method's stage, from the warm-up checkpoint, for `minutes` of CPU time."""
    if method in ("sft", "grpo"):
        raw = quickstart()
        stage = raw["stages"][0 if method == "sft" else 1]
        if method == "sft":
            stage["optim"] = {"lr": 3.0e-4}
    else:
        raw = yaml.safe_load((REPO / "recipes/tiny" / f"{method}.yaml").read_text())
        stage = raw["stages"][1]
    stage["train"] = {**stage.get("train", {}), "steps": 100000, "max_minutes": minutes, "budget_clock": "cpu",
                      "save_every": save_every, "keep_checkpoints": 100000, "eval_every": 0, "log_every": 1}
    raw |= {"output_dir": str(out), "seed": seed, "stages": [stage],
            "logging": {"report_to": [], "progress_bar": False}}
    raw["model"] = {"path": str(warmup)}
    raw["eval"] |= {"num_samples": 16}                      # the in-stage final eval; the benchmark evaluates itself
    return raw


# ------------------------------------------------------------------------------------------------ evaluation
def eval_config(task: dict, n: int):
    from posttrain.config import EvalConfig
    from posttrain.data import DataConfig

    data = DataConfig(source="task:arithmetic", split="test", task=task | {"num_examples": n})
    return EvalConfig(data=data, reward="steps", num_samples=n, max_new_tokens=40, batch_size=128)


def accuracy(model, tok, task: dict, n: int) -> float:
    from posttrain.evaluation import greedy_verdicts, held_out_examples

    cfg = eval_config(task, n)
    _, verdicts = greedy_verdicts(model, tok, cfg, held_out_examples(cfg, "bench"))
    return sum(verdicts) / len(verdicts)


def pass_at_k_and_entropy(model, tok, n: int, k: int = 8) -> tuple[float, float]:
    """pass@k over n problems at T = 1, and the mean token entropy of the policy over those samples."""
    import torch

    from posttrain.data import Tokenized, collate_demos
    from posttrain.evaluation import held_out_examples, verdicts
    from posttrain.policy import forward
    from posttrain.rl.kl import token_entropy
    from posttrain.rollout.base import SamplingConfig, encode_prompts
    from posttrain.rollout.hf import HFEngine, HFEngineConfig

    cfg = eval_config(TASK, n)
    examples = held_out_examples(cfg, "bench")
    ids = encode_prompts(tok, [ex.prompt for ex in examples])
    engine = HFEngine(model, tok, HFEngineConfig(batch_size=256))
    outs = engine.generate(ids, SamplingConfig(n=k, temperature=1.0, max_new_tokens=40, seed=1234))
    solved, entropies = 0, []
    for ex, p, group in zip(examples, ids, outs):
        solved += max(verdicts(cfg, [ex] * k, group, "bench")) == 1.0
        batch = collate_demos([Tokenized(p + c.token_ids, len(p)) for c in group], tok.pad_token_id)
        with torch.no_grad():
            h = token_entropy(forward(model, batch).logits)                          # [k, L]
        mask = batch.target_mask
        entropies.append(float((h * mask).sum() / mask.sum().clamp(min=1)))
    return solved / len(examples), statistics.mean(entropies)


def load(path: Path, weights: Path | None = None):
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    if weights is not None:
        missing, unexpected = model.load_state_dict(load_file(str(weights)), strict=False)
        if unexpected or any(not k.startswith("lm_head") for k in missing):
            raise RuntimeError(f"{weights}: missing {missing}, unexpected {unexpected}")
        model.tie_weights()
    return model, AutoTokenizer.from_pretrained(path)


# ------------------------------------------------------------------------------------------------ one run
def run_one(method: str, seed: int, args) -> dict:
    from posttrain.config import parse_recipe
    from posttrain.trainer import train

    out, warmup = Path(args.out) / "runs" / f"{method}-s{seed}", Path(args.out) / "warmup" / "final"
    started, cpu0 = time.perf_counter(), time.process_time()
    train(parse_recipe(method_recipe(method, seed, warmup, out, args.minutes, args.save_every), f"bench:{method}"))
    wall = time.perf_counter() - started
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "loss" in r]
    minutes_at = {r["step"]: r["budget/minutes"] for r in rows}
    curve = []
    for ckpt in sorted((out / "checkpoints").glob("step-*")):
        step = int(ckpt.name.split("-")[1])
        model, tok = load(warmup, ckpt / "model.safetensors")
        curve.append((minutes_at[step], step, accuracy(model, tok, TASK, 200)))
    model, tok = load(out / "final")
    result = {"method": method, "seed": seed, "steps": len(rows), "cpu_minutes": rows[-1]["budget/minutes"],
              "wall_minutes": wall / 60, "train_process_cpu_minutes": (time.process_time() - cpu0) / 60,
              **{f"acc_{name}": accuracy(model, tok, task, 500) for name, task in EVALS.items()}}
    result["pass8_id"], result["entropy"] = pass_at_k_and_entropy(model, tok, 200)
    rewards = [r["reward/mean"] for r in rows if "reward/mean" in r]
    k = max(1, len(rewards) // 10)
    result |= {"reward_first": sum(rewards[:k]) / k if rewards else None,
               "reward_last": sum(rewards[-k:]) / k if rewards else None,
               "demo_only_steps": sum("time/generate" not in r for r in rows) / len(rows),
               "curve": curve}
    (out / "result.json").write_text(json.dumps(result, indent=1))
    for ckpt in (out / "checkpoints").glob("step-*"):                 # the curve is measured: free the disk
        import shutil
        shutil.rmtree(ckpt)
    return result


# ---------------------------------------------------------------------------------------------------- report
def write_reports(results: list[dict], out: Path, args) -> None:
    fields = ["method", "seed", "steps", "cpu_minutes", "wall_minutes", "acc_id", "acc_ood_long", "acc_ood_ops",
              "pass8_id", "entropy", "reward_first", "reward_last", "demo_only_steps"]
    with (out / "runs.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fields, extrasaction="ignore")
        w.writeheader()
        w.writerows(results)
    summary = []
    for method in args.methods:
        runs = [r for r in results if r["method"] == method]
        if not runs:
            continue
        row = {"method": method, "seeds": len(runs), "steps": round(statistics.mean(r["steps"] for r in runs))}
        for key in ("acc_id", "acc_ood_long", "acc_ood_ops", "pass8_id", "entropy"):
            vals = [r[key] for r in runs]
            row[key] = f"{statistics.mean(vals):.3f} ({min(vals):.3f}-{max(vals):.3f})"
        summary.append(row)
    with (out / "summary.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, list(summary[0]))
        w.writeheader()
        w.writerows(summary)
    plot(results, out / "accuracy.png", args)


def plot(results: list[dict], path: Path, args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 5.5))
    colors = plt.get_cmap("tab20").colors                            # 11 methods: more than the default 10 colours
    for i, method in enumerate(args.methods):
        runs = [r for r in results if r["method"] == method and r["curve"]]
        if not runs:
            continue
        n = min(len(r["curve"]) for r in runs)                       # points all seeds reached
        xs = [statistics.mean(r["curve"][i][0] for r in runs) for i in range(n)]
        ys = [statistics.mean(r["curve"][i][2] for r in runs) for i in range(n)]
        ax.plot([0.0] + xs, [args.warmup_accuracy] + ys, marker="os^"[i % 3], markersize=3, label=method,
                color=colors[(2 * i) % 20 + (2 * i) // 20], linestyle="-" if method in ("sft", "grpo") else "--")
    ax.set_xlabel("training CPU minutes (one thread)")
    ax.set_ylabel("greedy accuracy, 200 held-out 3-step chains")
    ax.set_title(f"From one SFT warm-up; mean of {len(args.seeds)} seeds")
    ax.grid(alpha=0.3)
    ax.legend(ncol=2, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--minutes", type=float, default=3.0, help="CPU minutes of training per run")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--save-every", type=int, default=25)
    p.add_argument("--out", default="runs/bench-hybrids")
    p.add_argument("--run", nargs=2, metavar=("METHOD", "SEED"), help=argparse.SUPPRESS)   # one run (a worker)
    args = p.parse_args()
    args.methods, args.seeds = args.methods.split(","), [int(s) for s in args.seeds.split(",")]
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch

    torch.set_num_threads(1)
    out = Path(args.out)
    if args.run:
        print(json.dumps(run_one(args.run[0], int(args.run[1]), args)), flush=True)
        return
    unknown = sorted(set(args.methods) - set(METHODS))
    if unknown:
        p.error(f"unknown methods {unknown}; choose from {', '.join(METHODS)}")
    print(json.dumps({"load_before": os.getloadavg(), "minutes": args.minutes, "seeds": args.seeds}), flush=True)
    if not (out / "warmup/final/config.json").is_file():
        from posttrain.config import parse_recipe
        from posttrain.trainer import train

        train(parse_recipe(warmup_recipe(out), "bench:warmup"))
    model, tok = load(out / "warmup/final")
    args.warmup_accuracy = accuracy(model, tok, TASK, 200)
    print(json.dumps({"warmup_acc_id_200": args.warmup_accuracy}), flush=True)
    jobs = [(m, s) for s in args.seeds for m in args.methods
            if not (out / "runs" / f"{m}-s{s}" / "result.json").is_file()]
    running: list[tuple[subprocess.Popen, str]] = []
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    while jobs or running:
        while jobs and len(running) < args.workers:
            m, s = jobs.pop(0)
            cmd = [sys.executable, __file__, "--run", m, str(s), "--minutes", str(args.minutes), "--out", str(out),
                   "--save-every", str(args.save_every)]
            log = (out / f"log-{m}-s{s}.txt").open("w")
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO)
            running.append((proc, f"{m}-s{s}"))
        time.sleep(5)
        for proc, name in list(running):
            if proc.poll() is not None:
                running.remove((proc, name))
                print(json.dumps({"done": name, "rc": proc.returncode, "load": os.getloadavg()}), flush=True)
    results = [json.loads(f.read_text()) for f in sorted((out / "runs").glob("*/result.json"))]
    write_reports(results, out, args)
    print((out / "summary.csv").read_text())
    print(json.dumps({"load_after": os.getloadavg()}), flush=True)


if __name__ == "__main__":
    main()
