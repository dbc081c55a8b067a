"""Throughput of the `hf` rollout engine on the embedded tiny model, side by side with plain transformers sampling.

    python benchmarks/rollout_hf.py                      # quickstart-sized model (hidden 128, 2 layers), batch 64
    python benchmarks/rollout_hf.py --threads 1 --repeats 7 --max-new-tokens 128

Reports generated tokens per second (median over repeats, with min and max) for:
  engine                 HFEngine.generate, temperature 1 (records sampling + raw log-probs, EOS / length bookkeeping)
  engine top_p+stop      the same with top_p 0.95 and a stop string that never occurs (nucleus sort + stop checks)
  transformers sample    model.generate(do_sample=True) on the same batch, no log-probs (the floor to compare with)
The model is randomly initialised, so completions rarely hit EOS and almost all run to the budget: the numbers
measure decoding, not how soon a trained model stops. The load average (`uptime`) before and after is printed:
on a shared machine, compare numbers only at similar load.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import torch


def build(args):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from posttrain.data import DataConfig, load_rows, to_examples
    from posttrain.models import ModelConfig, resolve_model_path
    from posttrain.rollout import encode_prompts
    from posttrain.tiny import TinyModelConfig

    tiny = TinyModelConfig(hidden_size=args.hidden, num_layers=args.layers, num_heads=4, num_kv_heads=2,
                           intermediate_size=4 * args.hidden)
    path = resolve_model_path(ModelConfig(path="tiny", tiny=tiny), args.cache_dir)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    data = DataConfig(source="task:arithmetic", split="test", task={"digits": 2, "num_ops": 1, "num_examples": 500})
    rows, columns = load_rows(data)
    prompts = encode_prompts(tokenizer, [ex.prompt for ex in to_examples(rows, columns, data)[: args.batch]])
    return model, tokenizer, prompts


def time_engine(engine, prompts, sampling) -> tuple[float, int]:
    start = time.perf_counter()
    out = engine.generate(prompts, sampling)
    return time.perf_counter() - start, sum(len(c.token_ids) for group in out for c in group)


def time_plain(model, tokenizer, prompts, max_new_tokens: int, seed: int) -> tuple[float, int]:
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[tokenizer.pad_token_id] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    torch.manual_seed(seed)
    start = time.perf_counter()
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                             max_new_tokens=max_new_tokens, eos_token_id=tokenizer.eos_token_id,
                             pad_token_id=tokenizer.pad_token_id)
    seconds = time.perf_counter() - start
    generated = out[:, width:]
    ended = (generated == tokenizer.eos_token_id).int().cumsum(-1)          # tokens up to and including the first EOS
    return seconds, int(((ended == 0) | ((ended == 1) & (generated == tokenizer.eos_token_id))).sum())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--batch", type=int, default=64, help="prompts per generate call (n = 1)")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--cache-dir", default=".posttrain-cache", help="where the tiny model is built once")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from posttrain.rollout import ENGINES, SamplingConfig

    model, tokenizer, prompts = build(args)
    engine = ENGINES.get("hf")(model, tokenizer, {"batch_size": args.batch})
    budget = args.max_new_tokens
    cases = {
        "engine": lambda seed: time_engine(engine, prompts, SamplingConfig(temperature=1.0, max_new_tokens=budget,
                                                                           seed=seed)),
        "engine top_p+stop": lambda seed: time_engine(engine, prompts, SamplingConfig(
            temperature=1.0, top_p=0.95, stop=["@@@"], max_new_tokens=budget, seed=seed)),
        "transformers sample": lambda seed: time_plain(model, tokenizer, prompts, budget, seed),
    }
    load_before = os.getloadavg()
    print(f"model hidden {args.hidden} x {args.layers} layers ({sum(p.numel() for p in model.parameters()) / 1e6:.2f}M "
          f"params), batch {len(prompts)} prompts, max_new_tokens {budget}, torch threads {torch.get_num_threads()}, "
          f"{os.cpu_count()} CPUs")
    print(f"load average before: {' '.join(f'{x:.2f}' for x in load_before)}")
    for name, run in cases.items():
        run(0)                                                                 # warm-up
        rates, tokens = [], 0
        for r in range(args.repeats):
            seconds, tokens = run(r + 1)
            rates.append(tokens / seconds)
        print(f"{name:<22} {statistics.median(rates):>9.0f} tokens/s  (min {min(rates):.0f}, max {max(rates):.0f}; "
              f"{tokens} tokens per call, {args.repeats} repeats)")
    print(f"load average after:  {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
