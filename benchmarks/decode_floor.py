"""How far the `hf` rollout engine's decoding is from a bare decode loop, on the GRPO batch of benchmarks/vs_trl.py
(4 prompts x 8 samples, 32 new tokens, temperature 1), interleaved in one process:

    engine        HFEngine.generate (transformers generate + posttrain's sampler, log-probs, EOS bookkeeping)
    engine shared_prefill   the same with engine_args shared_prefill: each prompt's forward once per group
    bare loop     the model's forward with a DynamicCache, one token per step, multinomial sampling from
                  softmax(z), no log-probs, no stopping: the cost of the arithmetic plus the model's own Python
    prefill+1     one forward over the prompts and one decode step: the fixed part

    python benchmarks/decode_floor.py [--sizes 128x2,512x4] [--repeats 7]

Medians of wall and CPU seconds per call; `uptime` before and after.
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


def prompts(model_dir: str, tokenizer) -> list[list[int]]:
    import vs_trl

    from posttrain.rollout import encode_prompts

    rows = vs_trl.task_rows(vs_trl.PROMPTS)
    return encode_prompts(tokenizer, [[{"role": "user", "content": r["question"]}] for r in rows])


def bare_loop(model, contexts: list[list[int]], new_tokens: int, pad: int, steps: int):
    import torch
    from transformers import DynamicCache

    width = max(len(c) for c in contexts)
    ids = torch.tensor([[pad] * (width - len(c)) + c for c in contexts])                      # [B, S] left-padded
    mask = torch.tensor([[0] * (width - len(c)) + [1] * len(c) for c in contexts])            # [B, S]
    position = (mask.cumsum(-1) - 1).clamp(min=0)                                             # [B, S]
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        z = model(input_ids=ids, attention_mask=mask, position_ids=position, cache=cache,
                  use_cache=True, logits_to_keep=1).logits[:, -1]                             # [B, V]
        for _ in range(min(steps, new_tokens) - 1):
            token = torch.multinomial(torch.softmax(z.float(), -1), 1)                        # [B, 1]
            mask = torch.cat([mask, torch.ones_like(token)], dim=-1)
            position = position[:, -1:] + 1
            z = model(input_ids=token, attention_mask=mask, position_ids=position, cache=cache,
                      use_cache=True).logits[:, -1]


def measure(model_dir: str, repeats: int) -> None:
    import vs_trl
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from posttrain.rollout.base import SamplingConfig
    from posttrain.rollout.hf import HFEngine, HFEngineConfig

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    engine = HFEngine(model, tokenizer, HFEngineConfig(batch_size=vs_trl.PROMPTS))
    shared = HFEngine(model, tokenizer, HFEngineConfig(batch_size=vs_trl.PROMPTS, shared_prefill=True))
    ps = prompts(model_dir, tokenizer)
    contexts = [p for p in ps for _ in range(vs_trl.GROUP)]
    sampling = SamplingConfig(n=vs_trl.GROUP, temperature=1.0, max_new_tokens=vs_trl.NEW_TOKENS)
    runs = {"engine": lambda: engine.generate(ps, sampling),
            "engine shared_prefill": lambda: shared.generate(ps, sampling),
            "bare loop": lambda: bare_loop(model, contexts, vs_trl.NEW_TOKENS, tokenizer.pad_token_id, 10**6),
            "prefill+1": lambda: bare_loop(model, contexts, vs_trl.NEW_TOKENS, tokenizer.pad_token_id, 2)}
    times = {name: ([], []) for name in runs}
    generated = []
    for i in range(repeats + 1):
        for name, run in runs.items():
            wall, cpu = time.perf_counter(), time.process_time()
            out = run()
            if i:
                times[name][0].append(time.perf_counter() - wall)
                times[name][1].append(time.process_time() - cpu)
            if name == "engine":
                generated.append(statistics.mean(len(c.token_ids) for group in out for c in group))
    print(f"{Path(model_dir).name}: engine completions average {statistics.mean(generated):.1f} tokens of "
          f"{vs_trl.NEW_TOKENS}")
    for name, (wall, cpu) in times.items():
        print(f"  {name:22s} {statistics.median(wall):.3f} s wall, {statistics.median(cpu):.3f} s CPU per call")


def main() -> None:
    import torch

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="128x2,512x4")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--out", default="/tmp/vs-trl", help="where benchmarks/vs_trl.py builds the models")
    args = p.parse_args()
    torch.set_num_threads(1)
    import vs_trl

    models = vs_trl.build_models(args.sizes.split(","), Path(args.out))
    print(subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip(), flush=True)
    for size in args.sizes.split(","):
        measure(str(models[size]), args.repeats)
        print(subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip(), flush=True)


if __name__ == "__main__":
    main()
