"""Full-vocabulary quantities per position, without a [B, L, V] float32 copy in forward *or* in what autograd saves.

Every objective reads the vocabulary through these three functions; each formula lives here once:

    selective_log_softmax(logits, index)   log pi(a | s) = z_a - logsumexp(z)                 [B, L] or [B, L, K]
    full_vocab_kl(p_logits, q_logits)      KL(p || q) = sum_v p_v (log p_v - log q_v)          [B, L]
    sample_tokens(logits, k, temperature)  a_1..a_K ~ softmax(z / tau), with replacement      [B, L, K]

The first two are `torch.autograd.Function`s that save only their inputs (the logits, in the model's dtype, which
the model's graph keeps anyway) and [B, L] float32 statistics (logsumexp, KL), then recompute the softmax block by
block in backward. The float32 work buffers are bounded by `chunk_bytes` (default 64 MiB), whatever B, L and V are; the
only full-size tensor they create is the gradient w.r.t. the logits (in the logits' dtype), which any implementation
must return (for a slice such as `out.logits[:, :-1]`, autograd's own backward of the slice adds one more
full-size buffer, as for any implementation). Blocks are views of the logits: no copy of a non-contiguous slice.
"""
from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

CHUNK_BYTES = 64 * 2**20   # float32 work buffer per block


def _blocks(shape: tuple[int, int, int], chunk_bytes: int):
    """(batch slice, position slice) blocks of a [B, L, V] tensor, each at most ~chunk_bytes of float32."""
    b, length, vocab = shape
    rows = max(1, chunk_bytes // (4 * max(vocab, 1)))          # positions per block
    if rows >= length:                                          # several whole sequences per block
        per = max(1, rows // max(length, 1))
        for b0 in range(0, b, per):
            yield slice(b0, b0 + per), slice(0, length)
    else:                                                       # part of one sequence per block
        for i in range(b):
            for s0 in range(0, length, rows):
                yield slice(i, i + 1), slice(s0, s0 + rows)


def _as3d(x: Tensor) -> Tensor:
    """[B, L, V] view of [L, V] or [B, L, V] (no copy)."""
    if x.dim() == 2:
        return x.unsqueeze(0)
    if x.dim() != 3:
        raise ValueError(f"expected logits of shape [L, V] or [B, L, V], got {tuple(x.shape)}")
    return x


class _SelectiveLogSoftmax(torch.autograd.Function):
    """out[b, t, k] = z[b, t, a_k] - logsumexp_v z[b, t, v]; backward: g_k (onehot(a_k) - softmax(z)) summed over k."""

    @staticmethod
    def forward(ctx, logits: Tensor, index: Tensor, chunk_bytes: int) -> Tensor:   # [B, L, V], [B, L, K]
        lse = torch.empty(logits.shape[:2], dtype=torch.float32, device=logits.device)       # [B, L]
        out = torch.empty(index.shape, dtype=torch.float32, device=logits.device)            # [B, L, K]
        for bs, ts in _blocks(logits.shape, chunk_bytes):
            z = logits[bs, ts].float()                                                        # [b, t, V]
            lse[bs, ts] = torch.logsumexp(z, dim=-1)
            out[bs, ts] = z.gather(-1, index[bs, ts]) - lse[bs, ts, None]
        ctx.save_for_backward(logits, index, lse)
        ctx.chunk_bytes = chunk_bytes
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor):                                                  # [B, L, K]
        logits, index, lse = ctx.saved_tensors
        grad = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)        # [B, L, V]
        for bs, ts in _blocks(logits.shape, ctx.chunk_bytes):
            g = grad_out[bs, ts].float()                                                  # [b, t, K]
            p = logits[bs, ts].to(torch.float32, copy=True).sub_(lse[bs, ts, None]).exp_()   # [b, t, V] softmax
            p.mul_(-g.sum(-1, keepdim=True)).scatter_add_(-1, index[bs, ts], g)
            grad[bs, ts] = p
        return grad, None, None


def selective_log_softmax(logits: Tensor, index: Tensor, chunk_bytes: int = CHUNK_BYTES) -> Tensor:
    """log softmax(logits)[..., index] in float32, differentiable w.r.t. the logits.

    logits: [B, L, V] (or [L, V]), any float dtype; index: [B, L] -> [B, L], or [B, L, K] -> [B, L, K].
    """
    squeeze = index.dim() == logits.dim() - 1
    idx = _as3d(index.unsqueeze(-1) if squeeze else index)
    out = _SelectiveLogSoftmax.apply(_as3d(logits), idx, chunk_bytes)
    out = out.view(*index.shape, 1) if squeeze else out.view(index.shape)
    return out.squeeze(-1) if squeeze else out


class _FullVocabKL(torch.autograd.Function):
    """kl[b, t] = sum_v p_v (log p_v - log q_v), p = softmax(p_logits), q = softmax(q_logits).

    d kl / d q_logits = q - p;   d kl / d p_logits = p * (log p - log q - kl).
    """

    @staticmethod
    def forward(ctx, p_logits: Tensor, q_logits: Tensor, chunk_bytes: int) -> Tensor:   # [B, L, V] each
        kl = torch.empty(p_logits.shape[:2], dtype=torch.float32, device=p_logits.device)   # [B, L]
        for bs, ts in _blocks(p_logits.shape, chunk_bytes // 3):
            log_p = torch.log_softmax(p_logits[bs, ts], dim=-1, dtype=torch.float32)     # [b, t, V] log p
            log_q = torch.log_softmax(q_logits[bs, ts], dim=-1, dtype=torch.float32)     # [b, t, V] log q
            diff = log_p - log_q                                                        # [b, t, V]
            kl[bs, ts] = torch.linalg.vecdot(log_p.exp_(), diff)                        # sum_v p (log p - log q)
        ctx.save_for_backward(p_logits, q_logits, kl)
        ctx.chunk_bytes = chunk_bytes
        return kl

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_kl: Tensor):                                                  # [B, L]
        p_logits, q_logits, kl = ctx.saved_tensors
        need_p, need_q = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_p = torch.empty(p_logits.shape, dtype=p_logits.dtype, device=p_logits.device) if need_p else None
        grad_q = torch.empty(q_logits.shape, dtype=q_logits.dtype, device=q_logits.device) if need_q else None
        for bs, ts in _blocks(p_logits.shape, ctx.chunk_bytes // 3):
            g = grad_kl[bs, ts, None].float()                                            # [b, t, 1]
            if need_q:
                q = torch.softmax(q_logits[bs, ts], dim=-1, dtype=torch.float32)         # [b, t, V] q
                grad_q[bs, ts] = q.sub_(torch.softmax(p_logits[bs, ts], dim=-1, dtype=torch.float32)).mul_(g)
            if need_p:
                log_p = torch.log_softmax(p_logits[bs, ts], dim=-1, dtype=torch.float32)  # [b, t, V] log p
                shift = torch.log_softmax(q_logits[bs, ts], dim=-1, dtype=torch.float32).add_(kl[bs, ts, None])
                grad_p[bs, ts] = (log_p - shift).mul_(log_p.exp_()).mul_(g)              # p (log p - log q - kl) g
        return grad_p, grad_q, None


def full_vocab_kl(p_logits: Tensor, q_logits: Tensor, chunk_bytes: int = CHUNK_BYTES) -> Tensor:
    """KL(softmax(p_logits) || softmax(q_logits)) exactly over the vocabulary at every position, in float32.

    [B, L, V], [B, L, V] -> [B, L]; differentiable w.r.t. whichever input requires grad.
    """
    if p_logits.shape != q_logits.shape:
        raise ValueError(f"logits shapes differ: {tuple(p_logits.shape)} vs {tuple(q_logits.shape)}")
    kl = _FullVocabKL.apply(_as3d(p_logits), _as3d(q_logits), chunk_bytes)
    return kl.view(p_logits.shape[:-1])


@torch.no_grad()
def sample_tokens(logits: Tensor, k: int, temperature: float = 1.0, mask: Tensor | None = None,
                  chunk_bytes: int = CHUNK_BYTES) -> Tensor:
    """K tokens per position drawn with replacement from softmax(logits / temperature), by torch's global RNG.

    logits: [B, L, V]; mask: [B, L] (positions where it is 0 are not sampled and get token 0) -> [B, L, K] long.
    """
    lead = logits.shape[:-1]
    logits = _as3d(logits)
    b, length, vocab = logits.shape
    out = torch.zeros((b, length, k), dtype=torch.long, device=logits.device)          # [B, L, K]
    where = (mask.reshape(b, length) > 0).nonzero() if mask is not None else \
        torch.ones((b, length), dtype=torch.bool, device=logits.device).nonzero()      # [M, 2]
    rows = max(1, chunk_bytes // (4 * vocab))
    for start in range(0, where.shape[0], rows):
        i, t = where[start : start + rows].unbind(-1)                                   # [c], [c]
        probs = torch.softmax(logits[i, t].float() / temperature, dim=-1)              # [c, V] pi'(.|s_t)
        out[i, t] = torch.multinomial(probs, k, replacement=True)                      # [c, K]
    return out.view(*lead, k)
