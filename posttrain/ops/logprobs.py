"""Full-vocabulary quantities per position, without a [B, L, V] float32 copy in forward *or* in what autograd saves.

Every objective reads the vocabulary through these functions; each formula lives here once:

    selective_log_softmax(logits, index)   log pi(a | s) = z_a - logsumexp(z)                 [B, L] or [B, L, K]
    head_logprobs(hidden, weight, ...)     the same from the LM head's input, z = (h W^T + b) / T, never holding
                                           more than a block of z: [B, L] (+ the entropy, with its gradient)
    token_entropy(logits)                  H(pi) = -sum_v pi_v log pi_v, no grad                 [B, L]
    policy_entropy(logits)                 the same, differentiable (an entropy bonus)          [B, L]
    full_vocab_kl(p_logits, q_logits)      KL(p || q) = sum_v p_v (log p_v - log q_v)          [B, L]
    sample_tokens(logits, k, temperature)  a_1..a_K ~ softmax(z / tau), with replacement      [B, L, K]

`head_logprobs` is the vocabulary-scale path (policy.forward takes it unless an objective reads the full logits):
the [B, L, V] logits are never materialised, in any dtype; forward projects blocks of positions through the LM head
and keeps [B, L] statistics, backward projects them again and returns the gradients w.r.t. the hidden states, the
head's weight (float32 accumulation, in the weight's dtype) and bias.

The first two are `torch.autograd.Function`s that save only their inputs (the logits, in the model's dtype, which
the model's graph keeps anyway) and [B, L] float32 statistics (logsumexp, KL), then recompute the softmax block by
block in backward. The float32 work buffers are bounded by `chunk_bytes` (default 64 MiB), whatever B, L and V are; the
only full-size tensor they create is the gradient w.r.t. the logits (in the logits' dtype), which any implementation
must return (for a slice such as `out.logits[:, :-1]`, autograd's own backward of the slice adds one more
full-size buffer, as for any implementation). Blocks are views of the logits: no copy of a non-contiguous slice.
"""
from __future__ import annotations

import math

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
    if x is None:
        raise ValueError("the policy's [B, L, V] logits were not computed: an objective that reads PolicyOutput.logits "
                         "lists 'logits' in its `needs` (policy.forward then materialises them)")
    if x.dim() == 2:
        return x.unsqueeze(0)
    if x.dim() != 3:
        raise ValueError(f"expected logits of shape [L, V] or [B, L, V], got {tuple(x.shape)}")
    return x


def _entropy(z: Tensor, lse: Tensor, overwrite: bool = False) -> Tensor:
    """H = -sum_v pi_v log pi_v, log pi = z - logsumexp(z), of float32 logit rows z [c, V] with their logsumexp
    lse [c] -> [c] (a sum of non-negative terms: no cancellation when H is near 0). `overwrite`: z is scratch."""
    log_p = z.sub_(lse[:, None]) if overwrite else z - lse[:, None]                         # [c, V]
    return -torch.linalg.vecdot(log_p.exp(), log_p)


@torch.no_grad()
def token_entropy(logits: Tensor, chunk_bytes: int = CHUNK_BYTES) -> Tensor:
    """H(softmax(z)) at every position, float32, no gradient, block by block.   [B, L, V] -> [B, L]"""
    x = _as3d(logits)
    out = torch.empty(x.shape[:2], dtype=torch.float32, device=x.device)                 # [B, L]
    for bs, ts in _blocks(x.shape, chunk_bytes // 3):
        z = x[bs, ts].float().flatten(0, 1)                                               # [b*t, V]
        out[bs, ts] = _entropy(z, torch.logsumexp(z, -1)).view(out[bs, ts].shape)
    return out.view(logits.shape[:-1])


class _HeadLogProbs(torch.autograd.Function):
    """out[r] = z[r, a_r] - logsumexp(z[r]) and H[r] = -sum_v p log p, z = (h W^T + b) / T, over blocks of rows of h.

    backward, per block (g, g_H the incoming gradients of out and H; p = softmax(z)):
        dz = [ g (onehot(a) - p) - g_H p (log p + H) ] / T;   dh = dz W;   dW += dz^T h;   db += sum_r dz.
    The block's logits are recomputed (the same op in the same autocast state as forward)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, index, temperature: float, rows: int, with_entropy: bool):
        n = hidden.shape[0]
        lse = torch.empty(n, dtype=torch.float32, device=hidden.device)                      # [N]
        out = torch.empty(n, dtype=torch.float32, device=hidden.device)                      # [N]
        ent = torch.empty(n if with_entropy else 0, dtype=torch.float32, device=hidden.device)
        for r in range(0, n, rows):
            z = _head_block(hidden[r : r + rows], weight, bias, temperature)                 # [c, V] float32
            lse[r : r + rows] = torch.logsumexp(z, -1)
            out[r : r + rows] = z.gather(-1, index[r : r + rows, None]).squeeze(-1) - lse[r : r + rows]
            if with_entropy:
                ent[r : r + rows] = _entropy(z, lse[r : r + rows], overwrite=True)              # z is done with
        ctx.save_for_backward(hidden, weight, bias, index, lse, ent)
        ctx.temperature, ctx.rows = temperature, rows
        ctx.autocast = _autocast_state(hidden.device.type)
        return out, ent

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor, grad_ent: Tensor | None):                           # [N], [N] or None
        hidden, weight, bias, index, lse, ent = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        with_h = grad_ent is not None and grad_ent.numel() > 0 and bool(grad_ent.any())
        grad_h = torch.empty_like(hidden) if need_h else None                                # [N, H]
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None  # [V, H]
        grad_b = torch.zeros(weight.shape[0], dtype=torch.float32, device=weight.device) if need_b else None
        with torch.autocast(**ctx.autocast):
            for r in range(0, hidden.shape[0], ctx.rows):
                rs = slice(r, r + ctx.rows)
                h, g = hidden[rs], grad_out[rs, None].float()                                # [c, H], [c, 1]
                log_p = _head_block(h, weight, bias, ctx.temperature).sub_(lse[rs, None])     # [c, V] log p
                dz = log_p.exp()                                                             # [c, V] p
                if with_h:                                                                   # - g_H p (log p + H)
                    log_p.add_(ent[rs, None]).mul_(dz).mul_(-grad_ent[rs, None].float())
                dz.mul_(-g).scatter_add_(-1, index[rs, None], g)                             # g (onehot(a) - p)
                if with_h:
                    dz.add_(log_p)
                dz.div_(ctx.temperature)                                                     # [c, V] dL/d(hW^T+b)
                if need_h:
                    grad_h[rs] = dz.to(weight.dtype) @ weight                                # [c, H]
                if need_w:
                    grad_w += (dz.to(h.dtype).T @ h).float()                                 # [V, H]
                if need_b:
                    grad_b += dz.sum(0)
        return (grad_h, grad_w.to(weight.dtype) if need_w else None,
                grad_b.to(bias.dtype) if need_b else None, None, None, None, None)


def _head_block(h: Tensor, weight: Tensor, bias: Tensor | None, temperature: float) -> Tensor:
    """float32 logits of a block of hidden rows, z = (h W^T + b) / T, computed as the LM head computes them."""
    z = torch.nn.functional.linear(h, weight, bias).float()                                  # [c, V]
    return z.div_(temperature) if temperature != 1.0 else z


def _autocast_state(device_type: str) -> dict:
    enabled = torch.is_autocast_enabled(device_type)
    return {"device_type": device_type, "enabled": enabled,
            "dtype": torch.get_autocast_dtype(device_type) if enabled else torch.float32}


def head_logprobs(hidden: Tensor, weight: Tensor, bias: Tensor | None, index: Tensor, temperature: float = 1.0,
                  entropy: bool = False, chunk_bytes: int = CHUNK_BYTES) -> tuple[Tensor, Tensor | None]:
    """log softmax(z / T)[index] with z = hidden W^T + bias, in float32, and (with `entropy`) H(softmax(z / T)), both
    differentiable w.r.t. hidden, weight and bias; the [.., V] logits exist one block at a time.

    hidden: [B, L, H] (the LM head's input), weight: [V, H], bias: [V] or None, index: [B, L] -> ([B, L], [B, L])."""
    lead, vocab = index.shape, weight.shape[0]
    rows = max(1, chunk_bytes // (4 * vocab))
    out, ent = _HeadLogProbs.apply(hidden.reshape(-1, hidden.shape[-1]), weight, bias, index.reshape(-1),
                                   float(temperature), rows, entropy)
    return out.view(lead), ent.view(lead) if entropy else None


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


def policy_entropy(logits: Tensor, chunk_bytes: int = CHUNK_BYTES) -> Tensor:
    """H(softmax(z)) = log V - KL(softmax(z) || uniform) at every position, float32, differentiable w.r.t. the logits
    (through full_vocab_kl; the uniform logits are a stride-0 view).   [B, L, V] -> [B, L]"""
    uniform = torch.zeros((), dtype=torch.float32, device=logits.device).expand(logits.shape)   # [B, L, V] view
    return math.log(logits.shape[-1]) - full_vocab_kl(logits, uniform, chunk_bytes)


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
