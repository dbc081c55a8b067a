"""Peak memory of the log-prob (+ entropy) + backward path at Qwen's vocabulary: posttrain's fused LM head against the
naive `log_softmax(h W^T).gather` path.

    .venv/bin/python benchmarks/vocab_memory.py                       # B x L = 8 x 1024, H = 896, V = 151,936, fp32
    .venv/bin/python benchmarks/vocab_memory.py --tokens 8x256 --dtype bfloat16
    .venv/bin/python benchmarks/vocab_memory.py --cases grpo --no-naive

Each case runs in a fresh Python process (glibc told to return freed blocks above 64 KiB to the OS at once, as
tests/test_logprobs.py does) and reports the growth of its resident-memory high-water mark (VmHWM) over forward +
backward, after its inputs are allocated and the code paths warmed up on a tiny problem. The inputs are the LM head's:
hidden states h [B, L, H] and the head's weight W [V, H] (Qwen2.5-0.5B's tied embedding), both requiring grad; so
both sides pay the weight's gradient [V, H] (545 MB in float32), which any implementation returns.

    sft    log pi(y_t) at T = 1, loss = -sum, backward
    grpo   log pi_T(o_t) at T = 0.7 and the entropy H(pi_T) per position (no grad), loss = -sum A log pi, backward

naive = what a training loop writes without care: z = h W^T (model dtype), log_softmax(z.float() / T), gather; the
entropy as -(exp(log p) * log p).sum(-1) under no_grad. A naive case is run only when MemAvailable covers its
estimated need (three float32 [B, L, V] tensors); otherwise it is reported as skipped, and as killed when the
kernel's out-of-memory killer stops it (then its peak exceeded the memory available at its start).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import textwrap

PROBE = textwrap.dedent("""
    import json, sys, torch
    torch.set_num_threads(2)
    impl, case, b, l, h, v, dtype = sys.argv[1], sys.argv[2], *map(int, sys.argv[3:7]), getattr(torch, sys.argv[7])
    from posttrain.ops.logprobs import head_logprobs
    temperature, entropy = (0.7, True) if case == "grpo" else (1.0, False)

    def naive(hidden, weight, index):
        z = hidden @ weight.T                                                  # [B, L, V] model dtype
        logp = torch.log_softmax(z.float() / temperature, -1)                  # [B, L, V] float32
        lp = logp.gather(-1, index[..., None]).squeeze(-1)
        ent = None
        if entropy:
            with torch.no_grad():
                ent = -(logp.exp() * logp).sum(-1)
        return lp, ent

    def ours(hidden, weight, index):
        return head_logprobs(hidden, weight, None, index, temperature, entropy)

    fn = ours if impl == "posttrain" else naive
    peak = lambda: int(open("/proc/self/status").read().split("VmHWM:")[1].split()[0]) * 1024
    def run(b, l, v):
        torch.manual_seed(0)
        hidden = (torch.randn(b, l, h) * 0.5).to(dtype).requires_grad_(True)
        weight = (torch.randn(v, h) * 0.02).to(dtype).requires_grad_(True)
        index = torch.randint(0, v, (b, l))
        adv = torch.randn(b, l)
        return hidden, weight, index, adv
    small = run(1, 8, 64)                                                      # warm up the code paths
    lp, _ = fn(*small[:3]); (lp * small[3]).sum().backward()
    hidden, weight, index, adv = run(b, l, v)
    before = peak()
    lp, ent = fn(hidden, weight, index)
    (-(lp * adv).sum()).backward()
    print(json.dumps({"peak": peak() - before, "weight_grad": weight.numel() * weight.element_size(),
                      "entropy": float(ent.mean()) if ent is not None else None}))
""")


def mem_available() -> int:
    for line in open("/proc/meminfo"):
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


def probe(impl: str, case: str, b: int, l: int, h: int, v: int, dtype: str) -> dict | None:  # noqa: E741 (B x L)
    """The case's measurement, or None when the process was killed (the kernel's out-of-memory killer)."""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "2"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-c", PROBE, impl, case, str(b), str(l), str(h), str(v), dtype],
                         capture_output=True, text=True, env=env, cwd=root)
    if out.returncode == -9:
        return None
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-2000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", default="8x1024", help="B x L")
    p.add_argument("--hidden", type=int, default=896)
    p.add_argument("--vocab", type=int, default=151_936)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--cases", nargs="*", default=["sft", "grpo"], choices=["sft", "grpo"])
    p.add_argument("--no-naive", action="store_true", help="measure posttrain's path only")
    args = p.parse_args()
    b, l = map(int, args.tokens.lower().split("x"))  # noqa: E741 (B x L)
    mib, gib = 2**20, 2**30
    logits = b * l * args.vocab * 4
    print(f"uptime: {os.popen('uptime').read().strip()}")
    print(f"B x L = {b} x {l}, H = {args.hidden}, V = {args.vocab}, {args.dtype}; one float32 [B, L, V] = "
          f"{logits / gib:.2f} GiB")
    for case in args.cases:
        ours = probe("posttrain", case, b, l, args.hidden, args.vocab, args.dtype)
        print(f"{case:5s} posttrain {ours['peak'] / mib:9.0f} MiB (weight grad {ours['weight_grad'] / mib:.0f} MiB)",
              flush=True)
        need, available = 3 * logits, mem_available()
        if args.no_naive:
            continue
        if available < need + 2 * gib:
            print(f"      naive skipped: needs ~{need / gib:.1f} GiB, {available / gib:.1f} GiB available", flush=True)
            continue
        naive = probe("naive", case, b, l, args.hidden, args.vocab, args.dtype)
        if naive is None:
            print(f"      naive killed (out of memory) with {available / gib:.1f} GiB available at its start: "
                  f"posttrain / naive < {ours['peak'] / available:.3f}", flush=True)
            continue
        line = f"      naive {naive['peak'] / mib:9.0f} MiB | posttrain / naive = {ours['peak'] / naive['peak']:.3f}"
        if ours["entropy"] is not None:
            line += f" | mean entropy {ours['entropy']:.5f} vs {naive['entropy']:.5f}"
        print(line, flush=True)


if __name__ == "__main__":
    main()
