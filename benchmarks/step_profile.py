"""Where a GRPO (or SFT) step's time and a run's memory go, for posttrain and for TRL, on the settings of
benchmarks/vs_trl.py (the same models, data and sizes).

    python benchmarks/step_profile.py [--size 512x4] [--method grpo] [--steps 8] [--framework posttrain|trl]
                                      [--packed] [--micro 32] [--fast]

Time (posttrain): the medians over steady-state steps of what the trainer logs, time/generate, time/reward,
time/logprobs, time/train, time/sync and time/step.
Memory: the process's resident set (VmRSS) and its peak (ru_maxrss) after the imports, after the trainer is built
(model, data, optimizer), and the peak within each phase of the steps, from a thread sampling VmRSS every 5 ms while
the rollout engine generates, the rewards are computed, the log-probs are taken and the optimizer steps (posttrain;
for TRL: model.generate and the rest of the step; "other": building the trainer, what follows the last step).
`--tracemalloc` gives the Python-heap share of building the
trainer (modules imported, the data set, tokenised prompts and demonstrations; torch tensors are not Python-heap
allocations and do not count); the top-level packages first imported while the trainer is built are listed.
Run one process per figure, and check `uptime`: other load slows every phase alike.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import resource
import statistics
import sys
import tempfile
import threading
import time
import tracemalloc
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class PhaseSampler:
    """A thread sampling VmRSS; `phase(name)` marks what the main thread is doing; `peaks` the largest sample per
    phase."""

    def __init__(self, every: float = 0.005):
        self.current, self.peaks, self.every, self.stop = "other", {}, every, False
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self) -> None:
        while not self.stop:
            self.peaks[self.current] = max(self.peaks.get(self.current, 0.0), rss_mb())
            time.sleep(self.every)

    @contextlib.contextmanager
    def phase(self, name: str):
        before, self.current = self.current, name
        try:
            yield
        finally:
            self.peaks[name] = max(self.peaks.get(name, 0.0), rss_mb())
            self.current = before


def wrap(cls, method: str, sampler: PhaseSampler, name: str) -> None:
    original = getattr(cls, method)

    def wrapped(*args, **kwargs):
        with sampler.phase(name):
            return original(*args, **kwargs)

    setattr(cls, method, wrapped)


def profile_posttrain(model_dir: str, args, marks: dict) -> dict:
    import vs_trl

    from posttrain import trainer as trainer_module
    from posttrain.rollout.hf import HFEngine
    from posttrain.sources.rollouts import RolloutBuilder

    marks["imports"] = (rss_mb(), peak_mb())
    sampler, metrics = PhaseSampler(), []
    wrap(HFEngine, "generate", sampler, "generate")
    wrap(RolloutBuilder, "score", sampler, "reward")
    wrap(RolloutBuilder, "scored", sampler, "logprobs")
    wrap(trainer_module.Trainer, "optimize", sampler, "train")
    step = trainer_module.Trainer.train_step

    def logged_step(self, run):
        metrics.append(step(self, run))
        return metrics[-1]

    trainer_module.Trainer.train_step = logged_step
    with tempfile.TemporaryDirectory() as tmp:
        recipe = vs_trl.posttrain_recipe(model_dir, args.steps, f"{tmp}/run", args.method, args.packed, args.micro,
                                         shared=args.fast, share_prompts=args.fast)
        modules = set(sys.modules)
        if args.tracemalloc:
            tracemalloc.start()
        trainer = trainer_module.Trainer(recipe)
        heap = top_heap(tracemalloc.take_snapshot()) if args.tracemalloc else []
        tracemalloc.stop()
        marks["trainer built"] = (rss_mb(), peak_mb())
        imported = sorted({m.split(".")[0] for m in set(sys.modules) - modules if not m.startswith("_")}
                          - {m.split(".")[0] for m in modules})
        with sampler.phase("steps"):
            trainer.run()
    sampler.stop = True
    keys = sorted({k for m in metrics for k in m if k.startswith("time/")})
    steady = metrics[2:]
    return {"time": {k: statistics.median(m[k] for m in steady if k in m) for k in keys},
            "phase_peak_rss_mb": sampler.peaks, "python_heap_top": heap, "imported_building_the_trainer": imported}


def profile_trl(model_dir: str, method: str, steps: int, marks: dict) -> dict:
    import trl  # noqa: F401
    import vs_trl
    from transformers import GenerationMixin

    marks["imports"] = (rss_mb(), peak_mb())
    sampler = PhaseSampler()
    wrap(GenerationMixin, "generate", sampler, "generate")
    with tempfile.TemporaryDirectory() as tmp, sampler.phase("steps"):
        worker = vs_trl.worker_grpo_trl if method == "grpo" else vs_trl.worker_sft_trl
        worker(model_dir, steps, f"{tmp}/run")       # prints its own RESULT line (step times)
    sampler.stop = True
    return {"phase_peak_rss_mb": sampler.peaks}


def top_heap(snapshot, n: int = 5) -> list[str]:
    stats = snapshot.statistics("filename")
    total = sum(s.size for s in stats) / 2**20
    return [f"total {total:.1f} MB"] + [f"{s.size / 2**20:.1f} MB {s.traceback[0].filename}" for s in stats[:n]]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="512x4")
    p.add_argument("--method", default="grpo", choices=["grpo", "sft"])
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--framework", default="posttrain", choices=["posttrain", "trl"])
    p.add_argument("--packed", action="store_true", help="posttrain SFT with train.padding_free")
    p.add_argument("--fast", action="store_true", help="posttrain GRPO sharing each group's prompt: "
                   "rollout.engine_args.shared_prefill and train.share_prompts")
    p.add_argument("--micro", type=int, default=32, help="posttrain: train.micro_batch_size (32: no accumulation)")
    p.add_argument("--tracemalloc", action="store_true", help="posttrain: the Python heap's top files while the "
                   "trainer is built (tracing inflates the RSS figures of that run)")
    p.add_argument("--out", default="/tmp/vs-trl", help="where benchmarks/vs_trl.py builds the models")
    args = p.parse_args()
    marks = {"start": (rss_mb(), peak_mb())}
    import torch

    torch.set_num_threads(1)
    import vs_trl

    model_dir = str(vs_trl.build_models([args.size], Path(args.out))[args.size])
    marks["torch"] = (rss_mb(), peak_mb())
    if args.framework == "posttrain":
        out = profile_posttrain(model_dir, args, marks)
    else:
        out = profile_trl(model_dir, args.method, args.steps, marks)
    marks["end"] = (rss_mb(), peak_mb())
    out["rss_mb_then_peak_mb"] = {k: [round(v[0]), round(v[1])] for k, v in marks.items()}
    out["phase_peak_rss_mb"] = {k: round(v) for k, v in out["phase_peak_rss_mb"].items()}
    print(json.dumps({"size": args.size, "method": args.method, "framework": args.framework} | out, indent=1))


if __name__ == "__main__":
    main()
