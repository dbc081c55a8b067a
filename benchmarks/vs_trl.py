"""posttrain against TRL on the tiny Qwen2 model: SFT and GRPO seconds per step and peak RSS, plus a bare PyTorch
loop (forward, backward, clip, AdamW) on the same padded SFT batches. Regenerates the table of issue 13.

    python benchmarks/vs_trl.py [--quick] [--reps 2] [--threads 1] [--sizes 128x2,512x4] [--out DIR]

Settings, the same for every framework: random-init tiny Qwen2 (posttrain.tiny, tokenizer trained on the task),
2-digit 3-step arithmetic (task:arithmetic digits=2 num_ops=3, ops +-), AdamW lr 1e-4 without weight decay,
gradient clipping 1.0, float32. SFT: batch 32, loss on the completion tokens. GRPO: 4 prompts x 8 samples,
temperature 1, 32 new tokens, beta 0, one update per batch (32 sequences), reward `exact`. TRL's configs turn
gradient checkpointing on by default; it is turned off here, as posttrain does not checkpoint
(`--trl-checkpointing` keeps TRL's default).

Each (size, method, framework) is a whole separate process; within a repetition the frameworks of one cell run one
after the other, their order rotated between repetitions (interleaved). A process times the wall clock between the
ends of consecutive optimizer steps, drops the first `WARM` intervals (allocator and caches warming up) and
reports the median of the rest, its real (non-padding) tokens per second where it knows them, and its peak RSS
(`ru_maxrss`: the whole process, imports included). The table gives the median over repetitions; `uptime` is
printed before and after every repetition: other load on the machine slows every process it overlaps.

posttrain runs with its defaults apart from the settings above; `posttrain-fast` (GRPO) adds the two opt-in ways
of sharing a group's prompt: `rollout.engine_args.shared_prefill` (the prompt's forward once per group when
sampling) and `train.share_prompts` (once per group in the training forward).

Workers (what the parent starts; also usable alone):
    python benchmarks/vs_trl.py --worker sft-trl|sft-posttrain|sft-posttrain-packed|sft-bare|grpo-trl|grpo-posttrain
                                |grpo-posttrain-fast|grpo-posttrain-shared (shared_prefill only)
                                |grpo-posttrain-compiled (fast + train.compile)|sft-posttrain-compiled
                                |grpo-posttrain-mb8|sft-posttrain-mb8 (micro-batches of 8)
                                --model DIR --steps N
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

WARM = 2                       # step intervals dropped at the start of every process
LR, BATCH, PROMPTS, GROUP, NEW_TOKENS, MAX_LENGTH = 1e-4, 32, 4, 8, 32, 128
TRL_CHECKPOINTING = os.environ.get("VS_TRL_CHECKPOINTING") == "1"   # TRL's own default is on; posttrain's is off
TASK = {"digits": 2, "num_ops": 3, "ops": "+-"}
SIZES = {"128x2": {"hidden_size": 128, "num_layers": 2, "num_heads": 4, "num_kv_heads": 2, "intermediate_size": 512},
         "512x4": {"hidden_size": 512, "num_layers": 4, "num_heads": 8, "num_kv_heads": 2,
                   "intermediate_size": 2048}}
FRAMEWORKS = {"sft": ["trl", "posttrain", "posttrain-packed", "bare"], "grpo": ["trl", "posttrain", "posttrain-fast"]}
STEPS = {"full": {("128x2", "sft"): 24, ("128x2", "grpo"): 14, ("512x4", "sft"): 10, ("512x4", "grpo"): 8},
         "quick": {("128x2", "sft"): 10, ("128x2", "grpo"): 7, ("512x4", "sft"): 5, ("512x4", "grpo"): 5}}


# ------------------------------------------------------------------------------------------------------- workers
def task_rows(n: int) -> list[dict]:
    from posttrain.tasks.arithmetic import ArithmeticConfig, generate

    return generate(ArithmeticConfig(**TASK, num_examples=n))


def clock() -> tuple[float, float]:
    """(wall, this process's CPU time) in seconds."""
    return time.perf_counter(), time.process_time()


def report(ends: list[tuple[float, float]], tokens: list[int] | None = None) -> None:
    """One JSON line: the steady-state step intervals (wall and CPU), their medians, real tokens/s and the peak RSS."""
    steps = [b[0] - a[0] for a, b in zip(ends, ends[1:])][WARM - 1:]
    cpu = [b[1] - a[1] for a, b in zip(ends, ends[1:])][WARM - 1:]
    out = {"step_s": steps, "median_s": statistics.median(steps), "cpu_s": statistics.median(cpu),
           "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if tokens:
        steady = tokens[WARM:len(ends)]
        out["tokens_per_s"] = sum(steady) / sum(steps)
    print("RESULT " + json.dumps(out), flush=True)


def trl_step_clock(ends: list[tuple[float, float]]):
    from transformers import TrainerCallback

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            ends.append(clock())

    return Clock()


def worker_sft_trl(model_dir: str, steps: int, out: str) -> None:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    rows = task_rows(BATCH * (steps + 1))
    data = Dataset.from_list([{"prompt": [{"role": "user", "content": r["question"]}],
                               "completion": [{"role": "assistant", "content": r["solution"]}]} for r in rows])
    config = SFTConfig(output_dir=out, max_steps=steps, per_device_train_batch_size=BATCH, learning_rate=LR,
                       weight_decay=0.0, adam_beta2=0.95, lr_scheduler_type="constant", max_grad_norm=1.0,
                       max_length=MAX_LENGTH, use_cpu=True, bf16=False, report_to=[], save_strategy="no",
                       logging_steps=1000, disable_tqdm=True, seed=0, dataloader_num_workers=0,
                       gradient_checkpointing=TRL_CHECKPOINTING)
    ends: list[tuple[float, float]] = []
    trainer = SFTTrainer(model=AutoModelForCausalLM.from_pretrained(model_dir), args=config, train_dataset=data,
                         processing_class=AutoTokenizer.from_pretrained(model_dir), callbacks=[trl_step_clock(ends)])
    trainer.train()
    report(ends)


def worker_grpo_trl(model_dir: str, steps: int, out: str) -> None:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    from posttrain.rewards import exact

    rows = task_rows(PROMPTS * (steps + 1))
    data = Dataset.from_list([{"prompt": [{"role": "user", "content": r["question"]}], "answer": r["answer"]}
                              for r in rows])

    def exact_reward(prompts, completions, answer, **kwargs):
        return exact(prompts, [c[0]["content"] for c in completions], answer=answer)

    config = GRPOConfig(output_dir=out, max_steps=steps, per_device_train_batch_size=PROMPTS * GROUP,
                        num_generations=GROUP, max_completion_length=NEW_TOKENS, temperature=1.0, beta=0.0,
                        learning_rate=LR, weight_decay=0.0, adam_beta2=0.95, lr_scheduler_type="constant",
                        max_grad_norm=1.0, use_cpu=True, bf16=False, report_to=[], save_strategy="no",
                        logging_steps=1000, disable_tqdm=True, seed=0,
                        gradient_checkpointing=TRL_CHECKPOINTING)
    ends: list[tuple[float, float]] = []
    trainer = GRPOTrainer(model=AutoModelForCausalLM.from_pretrained(model_dir), reward_funcs=[exact_reward],
                          args=config, train_dataset=data, processing_class=AutoTokenizer.from_pretrained(model_dir),
                          callbacks=[trl_step_clock(ends)])
    trainer.train()
    report(ends)


def posttrain_recipe(model_dir: str, steps: int, out: str, method: str, packed: bool = False, micro: int = BATCH,
                     shared: bool = False, share_prompts: bool = False, compiled: bool = False):
    from posttrain.config import parse_recipe

    n = BATCH * (steps + 1) if method == "sft" else PROMPTS * (steps + 1)
    train = {"steps": steps, "batch_size": BATCH, "micro_batch_size": micro, "log_every": 1}
    if packed:
        train["padding_free"] = True
    if share_prompts:
        train["share_prompts"] = True
    if compiled:
        train["compile"] = True
    raw = {"output_dir": out, "seed": 0, "model": {"path": model_dir},
           "data": {"source": "task:arithmetic", "split": "train", "task": TASK | {"num_examples": n},
                    "max_length": MAX_LENGTH},
           "objectives": {"sft": {"aggregation": "token_mean"}, "grpo": {"beta": 0.0}},
           "train": train, "optim": {"lr": LR, "weight_decay": 0.0, "max_grad_norm": 1.0},
           "schedule": {"name": "constant", "warmup_steps": 0},
           "rollout": {"engine": "hf", "engine_args": {"batch_size": PROMPTS, "shared_prefill": shared},
                       "sampling": {"n": GROUP, "temperature": 1.0, "max_new_tokens": NEW_TOKENS},
                       "prompts_per_step": PROMPTS, "num_iterations": 1},
           "rewards": [{"name": "exact"}], "logging": {"report_to": [], "progress_bar": False},
           "stages": [{"name": method, "objectives": {method: 1.0}}]}
    return parse_recipe(raw, "benchmarks/vs_trl.py")


def worker_posttrain(model_dir: str, steps: int, out: str, method: str, packed: bool = False,
                     shared: bool = False, micro: int = BATCH, share_prompts: bool = False,
                     compiled: bool = False) -> None:
    from posttrain import trainer as trainer_module

    ends, tokens = [], []
    step = trainer_module.Trainer.train_step

    def timed_step(self, run):
        metrics = step(self, run)
        ends.append(clock())
        tokens.append(metrics["tokens_per_s"] * metrics["time/step"])
        return metrics

    trainer_module.Trainer.train_step = timed_step
    trainer_module.train(posttrain_recipe(model_dir, steps, out, method, packed, micro, shared, share_prompts,
                                                          compiled))
    report(ends, tokens if method == "sft" else None)


def worker_sft_bare(model_dir: str, steps: int, out: str) -> None:
    """Forward, backward, clip, AdamW on posttrain's own padded demonstration batches (trimmed to their longest row);
    the loss is the token mean of the completion tokens' cross-entropy."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from posttrain.data import collate_demos, load_rows, to_examples, tokenize_demos

    cfg = posttrain_recipe(model_dir, steps, out, "sft").stages[0].data
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    rows, columns = load_rows(cfg)
    items, _ = tokenize_demos(to_examples(rows, columns, cfg), tokenizer, cfg)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, betas=(0.9, 0.95), weight_decay=0.0)
    ends, tokens = [], []
    for s in range(steps):
        exp = collate_demos(items[s * BATCH:(s + 1) * BATCH], tokenizer.pad_token_id).trimmed()
        logits = model(input_ids=exp.input_ids, attention_mask=exp.attention_mask).logits[:, :-1]   # [B, L, V]
        mask = exp.target_mask                                                                       # [B, L]
        nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), exp.targets, reduction="none")
        loss = (nll * mask).sum() / mask.sum()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        ends.append(clock())
        tokens.append(int(exp.attention_mask.sum()))
    report(ends, tokens)


def run_worker(kind: str, model_dir: str, steps: int) -> None:
    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    with tempfile.TemporaryDirectory(prefix="vs-trl-") as tmp:
        out = str(Path(tmp) / "run")
        workers = {"sft-trl": lambda: worker_sft_trl(model_dir, steps, out),
                   "grpo-trl": lambda: worker_grpo_trl(model_dir, steps, out),
                   "sft-posttrain": lambda: worker_posttrain(model_dir, steps, out, "sft"),
                   "sft-posttrain-packed": lambda: worker_posttrain(model_dir, steps, out, "sft", packed=True),
                   "grpo-posttrain": lambda: worker_posttrain(model_dir, steps, out, "grpo"),
                   "grpo-posttrain-shared": lambda: worker_posttrain(model_dir, steps, out, "grpo", shared=True),
                   "grpo-posttrain-fast": lambda: worker_posttrain(model_dir, steps, out, "grpo", shared=True,
                                                                   share_prompts=True),
                   "grpo-posttrain-compiled": lambda: worker_posttrain(model_dir, steps, out, "grpo", shared=True,
                                                                       share_prompts=True, compiled=True),
                   "sft-posttrain-compiled": lambda: worker_posttrain(model_dir, steps, out, "sft", compiled=True),
                   "grpo-posttrain-mb8": lambda: worker_posttrain(model_dir, steps, out, "grpo", micro=8),
                   "sft-posttrain-mb8": lambda: worker_posttrain(model_dir, steps, out, "sft", micro=8),
                   "sft-bare": lambda: worker_sft_bare(model_dir, steps, out)}
        workers[kind]()


# -------------------------------------------------------------------------------------------------------- parent
def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def build_models(sizes: list[str], cache: Path) -> dict[str, Path]:
    from posttrain.tiny import TinyModelConfig, build_tiny_model

    out = {}
    for size in sizes:
        path = cache / f"tiny-{size}"
        if not (path / "config.json").is_file():
            build_tiny_model(path, TinyModelConfig(**SIZES[size], max_position_embeddings=256))
        out[size] = path
    return out


def spawn(kind: str, model: Path, steps: int, threads: int, trl_checkpointing: bool) -> dict:
    env = os.environ | {"OMP_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false",
                        "VS_TRL_CHECKPOINTING": "1" if trl_checkpointing else "0",
                        "TRANSFORMERS_VERBOSITY": "error", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, __file__, "--worker", kind, "--model", str(model), "--steps", str(steps)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"worker {kind} on {model.name} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][7:])


def cell(results: dict, size: str, method: str, fw: str, key: str) -> float:
    return statistics.median(r[key] for r in results[(size, method, fw)])


def ratio_text(results: dict, size: str, method: str, key: str, fw: str = "posttrain") -> str:
    """'TRL / posttrain (TRL/posttrain x)' of one figure (posttrain: the worker `fw`), or '-' when a side was
    skipped."""
    if (size, method, "trl") not in results or (size, method, fw) not in results:
        return "-"
    t, p = cell(results, size, method, "trl", key), cell(results, size, method, "posttrain", key)
    return f"{t:.3f} / {p:.3f} ({t / p:.2f}x)"


def rss_ratio(results: dict, size: str, method: str, fw: str) -> str:
    if (size, method, "trl") not in results or (size, method, fw) not in results:
        return "-"
    mine, theirs = (cell(results, size, method, f, "peak_rss_mb") for f in (fw, "trl"))
    return f"{mine / theirs:.2f}"


def table(results: dict, sizes: list[str], key: str) -> str:
    """The issue's table for one figure: `median_s` (wall seconds per step) or `cpu_s` (CPU seconds per step)."""
    rows = ["| model | SFT s/step TRL / posttrain (x) | GRPO s/step TRL / posttrain (x) | bare loop SFT s/step | "
            "posttrain padding-free SFT s/step | GRPO s/step TRL / posttrain sharing prompts (x) | "
            "peak RSS posttrain / TRL: SFT, GRPO, GRPO sharing prompts |", "|---|---|---|---|---|---|---|"]
    for size in sizes:
        extra = [f"{cell(results, size, m, fw, key):.3f}" if (size, m, fw) in results else "-"
                 for m, fw in (("sft", "bare"), ("sft", "posttrain-packed"))]
        extra.append(ratio_text(results, size, "grpo", key, "posttrain-fast"))
        rss = [rss_ratio(results, size, m, fw) for m, fw in (("sft", "posttrain"), ("grpo", "posttrain"),
                                                            ("grpo", "posttrain-fast"))]
        h, n = SIZES[size]["hidden_size"], SIZES[size]["num_layers"]
        rows.append(f"| hidden {h}, {n} layers | {ratio_text(results, size, 'sft', key)} | "
                    f"{ratio_text(results, size, 'grpo', key)} | {extra[0]} | {extra[1]} | {extra[2]} | "
                    f"{', '.join(rss)} |")
    return "\n".join(rows)


def detail(results: dict) -> str:
    rows = ["| model | method | framework | runs | wall s/step | CPU s/step | real tokens/s (wall) | peak RSS MB |",
            "|---|---|---|---|---|---|---|---|"]
    for (size, method, fw), runs in results.items():
        tps = [r["tokens_per_s"] for r in runs if "tokens_per_s" in r]
        rows.append(f"| {size} | {method} | {fw} | {len(runs)} | {cell(results, size, method, fw, 'median_s'):.3f} | "
                    f"{cell(results, size, method, fw, 'cpu_s'):.3f} | "
                    f"{f'{statistics.median(tps):.0f}' if tps else '-'} | "
                    f"{cell(results, size, method, fw, 'peak_rss_mb'):.0f} |")
    return "\n".join(rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="one repetition, fewer steps (about 3 minutes)")
    p.add_argument("--reps", type=int, default=2, help="repetitions of every cell (--quick: 1)")
    p.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of every worker")
    p.add_argument("--sizes", default="128x2,512x4")
    p.add_argument("--methods", default="sft,grpo")
    p.add_argument("--trl-checkpointing", action="store_true", help="TRL with its default gradient checkpointing")
    p.add_argument("--skip", default="", help="frameworks to leave out, e.g. posttrain-packed")
    p.add_argument("--out", default="/tmp/vs-trl", help="where the models are built (kept between calls)")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--steps", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        run_worker(args.worker, args.model, args.steps)
        return
    sizes, methods = args.sizes.split(","), args.methods.split(",")
    reps, steps = (1, STEPS["quick"]) if args.quick else (args.reps, STEPS["full"])
    models = build_models(sizes, Path(args.out))
    started, results = time.time(), {}
    print(f"threads per process {args.threads}; {reps} repetition(s); TRL gradient checkpointing "
          f"{'on' if args.trl_checkpointing else 'off'}; start: {uptime()}", flush=True)
    for rep in range(reps):
        for size in sizes:
            for method in methods:
                names = [fw for fw in FRAMEWORKS[method] if fw not in args.skip.split(",")]
                order = names[rep % len(names):] + names[:rep % len(names)]
                for fw in order:
                    r = spawn(f"{method}-{fw}", models[size], steps[(size, method)], args.threads,
                              args.trl_checkpointing)
                    results.setdefault((size, method, fw), []).append(r)
                    print(f"  rep {rep} {size} {method} {fw}: {r['median_s']:.3f} s/step, {r['cpu_s']:.3f} CPU "
                          f"s/step, {r['peak_rss_mb']:.0f} MB", flush=True)
        print(f"after repetition {rep}: {uptime()}", flush=True)
    print(f"\n{time.time() - started:.0f} s in all\n")
    print("wall seconds per step (medians):\n" + table(results, sizes, "median_s") + "\n")
    print("CPU seconds per step of the process (medians; less sensitive to other load):\n"
          + table(results, sizes, "cpu_s") + "\n")
    print(detail(results))


if __name__ == "__main__":
    main()
