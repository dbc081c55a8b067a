"""posttrain/ops/logprobs.py: values and gradients against plain autograd, sampling, and peak memory.

Run: /work/venv/bin/pytest tests/test_logprobs.py -q
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from posttrain.ops.logprobs import (
    CHUNK_BYTES,
    full_vocab_kl,
    head_logprobs,
    sample_tokens,
    selective_log_softmax,
    token_entropy,
)

CHUNKS = [1, 4 * 7 * 3, CHUNK_BYTES]   # one row per block, a few rows per block (crossing sequences), everything


def _naive_gather(logits, index):
    lp = torch.log_softmax(logits.double(), -1)
    return lp.gather(-1, index[..., None]).squeeze(-1) if index.dim() == logits.dim() - 1 else lp.gather(-1, index)


@pytest.mark.parametrize("chunk", CHUNKS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("k", [None, 5])
def test_selective_log_softmax_matches_autograd(chunk, dtype, k):
    g = torch.Generator().manual_seed(0)
    full = (3 * torch.randn(3, 10, 7, generator=g)).to(dtype).requires_grad_(True)   # [B, T, V]
    logits = full[:, :-1]                                        # the non-contiguous view policy.forward passes
    shape = (3, 9) if k is None else (3, 9, k)
    index = torch.randint(0, 7, shape, generator=g)
    if k is not None:
        index[..., 1] = index[..., 0]                            # duplicated samples must add their gradients
    weight = torch.randn(shape, generator=g)
    out = selective_log_softmax(logits, index, chunk_bytes=chunk)
    ref = _naive_gather(logits, index)
    assert out.dtype == torch.float32 and out.shape == shape
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)
    (grad,) = torch.autograd.grad((out * weight).sum(), full)
    (grad_ref,) = torch.autograd.grad((ref * weight.double()).sum(), full)
    assert grad.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(grad.double(), grad_ref.double(), atol=tol, rtol=tol)


def test_selective_log_softmax_unbatched():
    x = torch.randn(6, 11)
    t = torch.randint(0, 11, (6,))
    torch.testing.assert_close(selective_log_softmax(x, t), torch.log_softmax(x, -1)[torch.arange(6), t])


@pytest.mark.parametrize("rows", [1, 3, 1000])                 # positions per block: one, a few (crossing rows), all
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("bias", [False, True])
def test_head_logprobs_equals_the_head_then_log_softmax(rows, temperature, bias):
    """From the LM head's input: the same values, entropy and gradients (hidden, weight, bias) as projecting all
    logits z = (h W^T + b) / T and taking log_softmax + gather in float64."""
    g = torch.Generator().manual_seed(2)
    h = torch.randn(3, 5, 8, generator=g, requires_grad=True)                      # [B, L, H]
    w = torch.randn(11, 8, generator=g, requires_grad=True)                        # [V, H]
    b = torch.randn(11, generator=g, requires_grad=True) if bias else None
    index, weight = torch.randint(0, 11, (3, 5), generator=g), torch.randn(3, 5, generator=g)
    lp, ent = head_logprobs(h, w, b, index, temperature, entropy=True, chunk_bytes=rows * 4 * 11)
    z = (h.double() @ w.double().T + (b.double() if bias else 0)) / temperature    # [B, L, V]
    ref = torch.log_softmax(z, -1).gather(-1, index[..., None]).squeeze(-1)
    torch.testing.assert_close(lp.double(), ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ent.double(), -(z.softmax(-1) * z.log_softmax(-1)).sum(-1), atol=1e-5, rtol=1e-5)
    leaves = [h, w] + ([b] if bias else [])
    for got, want in zip(torch.autograd.grad((lp * weight).sum(), leaves, retain_graph=True),
                         torch.autograd.grad((ref * weight.double()).sum(), leaves, retain_graph=True)):
        assert got.dtype == torch.float32
        torch.testing.assert_close(got.double(), want.double(), atol=1e-5, rtol=1e-5)
    assert head_logprobs(h, w.detach(), None, index)[1] is None                    # entropy only when asked
    ent_ref = -(z.softmax(-1) * z.log_softmax(-1)).sum(-1)                         # an entropy bonus: its gradient
    ent_weight = torch.randn(3, 5, generator=g)
    for got, want in zip(torch.autograd.grad((lp * weight + ent * ent_weight).sum(), leaves),
                         torch.autograd.grad((ref * weight.double() + ent_ref * ent_weight.double()).sum(), leaves)):
        torch.testing.assert_close(got.double(), want.double(), atol=1e-5, rtol=1e-5)


def test_policy_entropy_is_token_entropy_with_its_gradient():
    from posttrain.ops.logprobs import policy_entropy

    g = torch.Generator().manual_seed(3)
    z = torch.randn(2, 4, 9, generator=g, requires_grad=True)
    h = policy_entropy(z, chunk_bytes=4 * 9 * 3)
    torch.testing.assert_close(h.detach(), token_entropy(z))
    ref = -(z.double().softmax(-1) * z.double().log_softmax(-1)).sum(-1)
    w = torch.randn(2, 4, generator=g)
    (got,), (want,) = torch.autograd.grad((h * w).sum(), [z]), torch.autograd.grad((ref * w.double()).sum(), [z])
    torch.testing.assert_close(got.double(), want.double(), atol=1e-6, rtol=1e-5)


def test_token_entropy_by_hand():
    logits = torch.tensor([[[0.0, 0.0, 0.0, 0.0], [math.log(3), 0.0, -1e4, -1e4]]])  # uniform; p = (3/4, 1/4)
    expected = [math.log(4), -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))]
    assert token_entropy(logits)[0].tolist() == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize("chunk", CHUNKS)
def test_full_vocab_kl_both_directions(chunk):
    g = torch.Generator().manual_seed(1)
    p = torch.randn(2, 6, 9, generator=g, requires_grad=True)
    q = torch.randn(2, 6, 9, generator=g, requires_grad=True)
    w = torch.randn(2, 6, generator=g)
    kl = full_vocab_kl(p, q, chunk_bytes=chunk)
    lp, lq = torch.log_softmax(p.double(), -1), torch.log_softmax(q.double(), -1)
    ref = (lp.exp() * (lp - lq)).sum(-1)
    torch.testing.assert_close(kl.double(), ref, atol=1e-6, rtol=1e-5)
    grads = torch.autograd.grad((kl * w).sum(), [p, q])
    grads_ref = torch.autograd.grad((ref * w.double()).sum(), [p, q])
    for a, b in zip(grads, grads_ref):
        torch.testing.assert_close(a.double(), b.double(), atol=1e-6, rtol=1e-5)
    # only the input that requires grad gets one (the ASFT case: the reference is frozen): d KL / dq = q - p
    (gq,) = torch.autograd.grad(full_vocab_kl(p.detach(), q, chunk_bytes=chunk).sum(), [q])
    torch.testing.assert_close(gq.double(), lq.exp() - lp.exp(), atol=1e-6, rtol=1e-5)
    assert torch.all(full_vocab_kl(p, p.detach()).abs() < 1e-6)


def test_sample_tokens_follows_the_tempered_softmax():
    torch.manual_seed(0)
    logits = torch.tensor([[[2.0, 0.0, -1.0, 1.0], [0.0, 0.0, 0.0, 5.0]]])      # [1, 2, 4]
    mask = torch.tensor([[1.0, 0.0]])
    a = sample_tokens(logits, 40_000, temperature=2.0, mask=mask)                # [1, 2, K]
    assert a.shape == (1, 2, 40_000) and a.dtype == torch.long
    freq = torch.bincount(a[0, 0], minlength=4).double() / 40_000
    torch.testing.assert_close(freq, torch.softmax(logits[0, 0].double() / 2.0, -1), atol=0.01, rtol=0)
    assert torch.all(a[0, 1] == 0)                                               # masked: not sampled
    torch.manual_seed(0)
    assert torch.equal(sample_tokens(logits, 40_000, 2.0, mask), a)              # global RNG: reproducible


# ------------------------------------------------------------------------------------------------ memory
# How peak memory is measured on CPU: each variant runs in a fresh Python process. glibc is told to serve every
# allocation above 64 KiB by mmap (MALLOC_MMAP_THRESHOLD_), so freed tensors go back to the OS at once and the
# resident set tracks live tensors; the process's high-water mark of resident memory (getrusage ru_maxrss) after
# forward + backward, minus the mark before (inputs allocated, code paths warmed up on a tiny problem), is the peak
# the operation added. torch has no CPU allocator statistics, and tracemalloc does not see torch's allocations.
PROBE = textwrap.dedent("""
    import json, resource, sys, torch
    torch.set_num_threads(1)
    mode, dtype, k = sys.argv[1], getattr(torch, sys.argv[2]), int(sys.argv[3])
    from posttrain.ops.logprobs import selective_log_softmax
    B, T, V = 2, 513, 32000
    torch.manual_seed(0)
    full = torch.randn(B, T, V, dtype=dtype).requires_grad_(True)
    index = torch.randint(0, V, (B, T - 1, k) if k else (B, T - 1))
    naive = lambda x, i: torch.log_softmax(x.float(), -1).gather(-1, i[..., None] if i.dim() == 2 else i)
    fn = selective_log_softmax if mode == "ours" else naive
    small = torch.randn(1, 8, 64, dtype=dtype, requires_grad=True)
    fn(small[:, :-1], torch.zeros((1, 7, k) if k else (1, 7), dtype=torch.long)).sum().backward()
    # VmHWM, not ru_maxrss: Linux carries ru_maxrss over fork+exec, so a child of a large pytest process would
    # start with its parent's high-water mark and see nothing of the op; VmHWM belongs to this process's own memory.
    peak = lambda: int(open("/proc/self/status").read().split("VmHWM:")[1].split()[0]) * 1024
    before = peak()
    fn(full[:, :-1], index).sum().backward()
    print(json.dumps({"peak": peak() - before, "grad": B * (T - 1) * V * full.element_size(),
                      "slice_grad": B * T * V * full.element_size()}))
""")


def _probe(mode: str, dtype: str, k: int = 0) -> subprocess.Popen:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-c", PROBE, mode, dtype, str(k)], stdout=subprocess.PIPE, text=True,
                            env=env, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_peak_memory_forward_backward_vocab_32k_seq_512():
    """Bound: peak <= grad + slice_grad + CHUNK_BYTES + 8 MiB, where grad is the [B, L, V] gradient any implementation
    returns (model dtype) and slice_grad the [B, T, V] buffer autograd allocates for the `logits[:, :-1]` view; that
    leaves one float32 work block (64 MiB) and no [B, L, V] float32 copy. The naive log_softmax + gather keeps a float32
    log-softmax for backward and builds two more in it: measured here ~375 MiB against ~250 (float32 logits) and ~156
    (bfloat16 logits) for ours, B=2, T=513, V=32000. K=256 sampled indices per position (OTR) cost the same: the
    [B, L, K, V] tensor (33 GB) is never built."""
    cases = [("ours", "float32", 0), ("ours", "bfloat16", 0), ("ours", "bfloat16", 256),
             ("naive", "float32", 0), ("naive", "bfloat16", 0)]
    mib = 2**20
    for attempt in range(3):  # RSS is the instrument: re-measure if it failed to see the naive version's copies
        results = {}
        for case in cases:  # one at a time: parallel probes put the machine under memory pressure and skew RSS
            proc = _probe(*case)
            out, _ = proc.communicate(timeout=300)
            assert proc.returncode == 0, case
            results[case] = json.loads(out.strip().splitlines()[-1])
        naive = [r for c, r in results.items() if c[0] == "naive"]
        if all(r["peak"] > r["grad"] + r["slice_grad"] + CHUNK_BYTES + 8 * mib for r in naive):
            break
    report = {f"{m}/{d}/K={k}": round(r["peak"] / mib, 1) for (m, d, k), r in results.items()}
    print("peak MiB added by forward+backward:", report)
    for case, r in results.items():
        bound = r["grad"] + r["slice_grad"] + CHUNK_BYTES + 8 * mib
        if case[0] == "ours":
            assert r["peak"] <= bound, (case, report)
        else:   # the measurement can see the difference: the naive version breaks the same bound
            assert r["peak"] > bound, (case, report)
    assert results[("ours", "bfloat16", 0)]["peak"] < 0.6 * results[("naive", "bfloat16", 0)]["peak"], report


HEAD_PROBE = textwrap.dedent("""
    import json, sys, torch
    torch.set_num_threads(1)
    mode = sys.argv[1]
    from posttrain.ops.logprobs import head_logprobs
    B, L, H, V = 2, 256, 64, 151936
    def naive(h, w, i):
        logp = torch.log_softmax((h @ w.T).float() / 0.7, -1)
        with torch.no_grad():
            ent = -(logp.exp() * logp).sum(-1)
        return logp.gather(-1, i[..., None]).squeeze(-1), ent
    fn = naive if mode == "naive" else lambda h, w, i: head_logprobs(h, w, None, i, 0.7, entropy=True)
    def inputs(b, l, v):
        torch.manual_seed(0)
        return (torch.randn(b, l, H, requires_grad=True), torch.randn(v, H, requires_grad=True),
                torch.randint(0, v, (b, l)))
    small = inputs(1, 4, 32)
    fn(*small)[0].sum().backward()
    h, w, i = inputs(B, L, V)
    peak = lambda: int(open("/proc/self/status").read().split("VmHWM:")[1].split()[0]) * 1024
    before = peak()
    lp, ent = fn(h, w, i)
    lp.sum().backward()
    print(json.dumps({"peak": peak() - before, "weight_grad": w.numel() * 4, "logits": B * L * V * 4}))
""")


def test_peak_memory_of_the_fused_head_at_qwen_vocabulary():
    """Log-probs at T = 0.7 + entropy + backward from the LM head's input, V = 151,936, B x L = 2 x 256: the added
    peak is the weight's gradient [V, H] plus float32 work blocks (a few CHUNK_BYTES), not a [B, L, V] tensor (297 MiB
    here); the naive head + log_softmax + gather exceeds that bound (the instrument sees the difference).
    benchmarks/vocab_memory.py measures the same at Qwen2.5-0.5B's head and B x L = 8 x 1024."""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "1"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    results = {}
    for mode in ("fused", "naive"):
        out = subprocess.run([sys.executable, "-c", HEAD_PROBE, mode], capture_output=True, text=True, env=env,
                             cwd=root, timeout=300)
        assert out.returncode == 0, out.stderr[-2000:]
        results[mode] = json.loads(out.stdout.strip().splitlines()[-1])
    fused, naive = results["fused"], results["naive"]
    bound = fused["weight_grad"] + 3 * CHUNK_BYTES + 16 * 2**20
    assert bound < fused["logits"] + fused["weight_grad"]                  # the bound leaves no room for [B, L, V]
    assert fused["peak"] <= bound, results
    assert naive["peak"] > bound, results
