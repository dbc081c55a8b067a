"""Real (non-padding) tokens per second of one SFT step, padded vs padding-free, in one process, interleaved batch by
batch, on the settings of benchmarks/vs_trl.py (batch 32 of 2-digit 3-step arithmetic demonstrations):

    bare       the bare PyTorch loop: model(input_ids, attention_mask).logits, cross-entropy token mean on the
               completion tokens, backward, clip 1.0, AdamW
    posttrain  posttrain.policy.forward (fused LM head) with the same loss, backward, clip, AdamW
    packed     the same with padding_free=True (train.padding_free: the batch's sequences packed into fewer rows)

    python benchmarks/padding_free.py [--sizes 128x2,512x4] [--batches 12] [--mixed]

`--mixed` alternates 1-step and 6-step chains (lengths that vary, as in real data sets): with 3-step chains only,
every sequence is within a few tokens of the longest, no two fit in one row, and packing removes nothing.

Every variant sees the same batches (posttrain's collate, trimmed to the longest row) in rotating order; the first
two rounds are dropped. Prints the padding fraction of the batches, the packed rows per batch, and per variant the
median of real tokens / wall second and real tokens / CPU second of the process, with `uptime` before and after.
"""
from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))


def batches(model_dir: str, count: int, mixed: bool) -> list:
    """`count` batches of vs_trl's SFT data; `mixed`: every other demonstration a 1-step chain, the others 6-step
    chains (lengths that vary, as in real data sets)."""
    import dataclasses
    import random

    import vs_trl
    from transformers import AutoTokenizer

    from posttrain.data import collate_demos, load_rows, to_examples, tokenize_demos

    cfg = vs_trl.posttrain_recipe(model_dir, count, "/tmp/unused", "sft").stages[0].data
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    parts = []
    for ops in ([1, 6] if mixed else [cfg.task["num_ops"]]):
        part = dataclasses.replace(cfg, task=cfg.task | {"num_ops": ops})
        rows, columns = load_rows(part)
        parts.append(tokenize_demos(to_examples(rows, columns, part), tokenizer, part)[0])
    items = [item for group in zip(*parts) for item in group]
    random.Random(0).shuffle(items)
    b = vs_trl.BATCH
    return [collate_demos(items[i * b:(i + 1) * b], tokenizer.pad_token_id).trimmed() for i in range(count)]


def variants(model):
    import torch

    from posttrain.policy import forward

    def bare(exp):
        logits = model(input_ids=exp.input_ids, attention_mask=exp.attention_mask).logits[:, :-1]   # [B, L, V]
        nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), exp.targets, reduction="none")
        return (nll * exp.target_mask).sum() / exp.target_mask.sum()

    def posttrain(exp, padding_free=False):
        out = forward(model, exp, padding_free=padding_free)                                        # [B, L]
        return -(out.logprobs * exp.target_mask).sum() / exp.target_mask.sum()

    return {"bare": bare, "posttrain": posttrain, "packed": lambda exp: posttrain(exp, padding_free=True)}


def measure(model_dir: str, count: int, mixed: bool) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    from posttrain.ops.packing import plan_packing

    data = batches(model_dir, count, mixed)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.0)
    runs = variants(model)
    rates = {name: ([], []) for name in runs}
    for i, exp in enumerate(data):
        names = list(runs)[i % len(runs):] + list(runs)[:i % len(runs)]
        for name in names:
            wall, cpu = time.perf_counter(), time.process_time()
            runs[name](exp).backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if i >= 2:
                real = float(exp.attention_mask.sum())
                rates[name][0].append(real / (time.perf_counter() - wall))
                rates[name][1].append(real / (time.process_time() - cpu))
    real = sum(float(e.attention_mask.sum()) for e in data)
    padded = sum(e.input_ids.numel() for e in data)
    rows = statistics.mean(plan_packing(e.attention_mask).rows for e in data)
    print(f"{Path(model_dir).name}: padding {1 - real / padded:.1%} of the padded batches; packed rows per batch of "
          f"32: {rows:.1f}")
    base = statistics.median(rates["bare"][1])
    for name, (wall, cpu) in rates.items():
        print(f"  {name:9s} real tokens/s: {statistics.median(wall):7.0f} wall, {statistics.median(cpu):7.0f} CPU "
              f"({statistics.median(cpu) / base:.2f}x the bare loop, CPU)")


def main() -> None:
    import torch

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="128x2,512x4")
    p.add_argument("--batches", type=int, default=12)
    p.add_argument("--mixed", action="store_true", help="half 1-step, half 6-step chains: lengths that vary")
    p.add_argument("--out", default="/tmp/vs-trl", help="where benchmarks/vs_trl.py builds the models")
    args = p.parse_args()
    torch.set_num_threads(1)
    import vs_trl

    models = vs_trl.build_models(args.sizes.split(","), Path(args.out))
    print(subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip(), flush=True)
    for size in args.sizes.split(","):
        measure(str(models[size]), args.batches, args.mixed)
        print(subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip(), flush=True)


if __name__ == "__main__":
    main()
