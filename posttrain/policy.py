"""One forward pass of a causal LM over an Experience, returning what objectives read.

Two ways through the LM head (the vocabulary is where the memory goes: at V = 151,936 the float32 [B, L, V] logits
of 8 x 1024 tokens are 5 GB, and a naive log_softmax + gather keeps several of them for backward):

    fused (default)   the head's input h [B, L, H] is captured as it enters the LM head (which then projects
                      nothing), and ops.head_logprobs projects blocks of positions itself: log-probs [B, L] and the
                      entropy [B, L] without ever holding [B, L, V]. `PolicyOutput.logits` is None.
    full logits       the model's own head over positions 0..T-2, then ops.selective_log_softmax: when an objective
                      reads the logits (`logits=True`: ASFT's KL, OTR's samples), when the head is not a plain
                      nn.Linear (e.g. a PEFT-wrapped head), and under ZeRO-3 (the head's weight is partitioned
                      outside its own forward).
"""
from __future__ import annotations

import contextlib
import functools
import inspect
import weakref
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from posttrain.experience import PROMPT, Experience
from posttrain.models import is_partitioned, language_model, unwrap
from posttrain.ops.logprobs import head_logprobs, policy_entropy, selective_log_softmax
from posttrain.ops.packing import MASKED_ATTENTION, Packing, pack, plan_packing, plan_shared_prompts, unpack

LAYOUTS = ("padded", "padding_free", "shared_prompts")   # how a batch is laid out for the model (see forward)


@dataclass
class PolicyOutput:
    logits: Tensor | None    # [B, L, V] logits at each position for the token it predicts, divided by the temperature
                             # (model dtype), only when asked for (an objective's needs has "logits"); else None
    logprobs: Tensor | None  # [B, L] float32 log pi_T(target_t | s_t) = log softmax(z / T)[target_t]
    values: Tensor | None = None   # [B, L] float32 V(s_t), when the model has a value head (rl/value_head.py; PPO)
    entropy: Tensor | None = None  # [B, L] float32 H(pi_T(. | s_t)), differentiable, when asked for ("entropy")


def forward(model: torch.nn.Module, exp: Experience, temperature: float = 1.0, logprobs: bool = True,
            logits: bool = False, entropy: bool = False, layout: str = "padded", compiled: bool = False
            ) -> PolicyOutput:
    """Teacher-forced pass. `temperature` T scales the logits, z / T, so that RL objectives score the sampled tokens
    under the distribution they were drawn from (the rollout's sampling temperature; T = 1 for demonstrations).

    The LM head sees positions 0..T-2 only (`logits_to_keep`, when the model takes it): the last position predicts
    nothing. `logits=True` materialises the [B, L, V] logits (see the module docstring); `logprobs=False` skips the
    target log-probabilities (a reference model whose logits are all that is read); `entropy` adds H per position.
    `layout` "padding_free" runs the model on the real tokens only, packed into fewer rows with per-sequence position
    ids; "shared_prompts" runs each distinct prompt once, followed by the continuations of every row that begins with
    it (ops/packing.py). Either way every output is put back at its padded place: the same outputs, less work.
    `compiled` runs the backbone through torch.compile (see compiled_backbone)."""
    length = exp.input_ids.shape[1] - 1                                  # L = T - 1
    head = None if logits else fusable_head(model)
    packing = _plan(exp, layout)
    if packing is None:
        keep = {"logits_to_keep": torch.arange(length, device=exp.input_ids.device)} if _keeps_logits(model) else {}
        inputs = {"input_ids": exp.input_ids, "attention_mask": exp.attention_mask, **keep}
    else:                     # [R, P]; without a 4D mask transformers masks each sequence found from its position ids
        inputs = {"input_ids": pack(exp.input_ids, packing), "position_ids": packing.position_ids}
        if packing.attention is not None:
            inputs["attention_mask"] = _model_mask(model, packing.attention)
    restore = (lambda y: y) if packing is None else (lambda y: unpack(y, packing))   # [R, P, ...] -> [B, T, ...]
    with _capture_input(head) as seen, compiled_backbone(model, compiled):
        out = model(**inputs, use_cache=False)
    values = out.get("values") if hasattr(out, "get") else getattr(out, "values", None)  # [B, T or L] value head
    values = restore(values)[:, :length] if isinstance(values, torch.Tensor) else None   # (ModelOutput.values: method)
    if head is not None:
        hidden = restore(seen[0])[:, :length]                            # [B, L, H] the LM head's input
        lp, ent = head_logprobs(hidden, head.weight, head.bias, exp.targets, temperature, entropy)
        return PolicyOutput(logits=None, logprobs=lp if logprobs else None, values=values, entropy=ent)
    z = restore(out.logits)
    z = z if z.shape[1] == length else z[:, :length]                     # [B, L, V]
    if temperature != 1.0:
        z = z / temperature                                              # z / T
    return PolicyOutput(logits=z, logprobs=selective_log_softmax(z, exp.targets) if logprobs else None,
                        values=values, entropy=policy_entropy(z) if entropy else None)


_COMPILED: weakref.WeakKeyDictionary[torch.nn.Module, Callable] = weakref.WeakKeyDictionary()


@contextlib.contextmanager
def compiled_backbone(model: torch.nn.Module, enabled: bool):
    """While active, the language model's backbone (the decoder stack under the LM head, which stays eager for the
    fused log-probs) runs torch.compile'd: one compiled function per backbone, made at its first use and kept; dynamo
    compiles again when shapes change, then treats them as dynamic. Generation calls the same module outside this
    context and stays eager. A no-op for `enabled=False`."""
    if not enabled:
        yield
        return
    backbone = language_model(unwrap(model)).base_model
    if backbone not in _COMPILED:
        _COMPILED[backbone] = torch.compile(backbone.forward)
    backbone.forward = _COMPILED[backbone]
    try:
        yield
    finally:
        del backbone.forward


def _plan(exp: Experience, layout: str) -> Packing | None:
    if layout == "padding_free":
        return plan_packing(exp.attention_mask)
    if layout == "shared_prompts":
        return plan_shared_prompts(exp.attention_mask, exp.source == PROMPT, exp.input_ids)
    if layout != "padded":
        raise ValueError(f"policy.forward: layout must be one of {LAYOUTS}, got {layout!r}")
    return None


def attention_implementation(model: torch.nn.Module) -> str:
    """The (unwrapped) language model's attention implementation: sdpa, eager, flash_attention_2, ..."""
    return language_model(unwrap(model)).config._attn_implementation


def _model_mask(model: torch.nn.Module, allowed: Tensor) -> Tensor:
    """A bool [R, 1, P, P] mask (True = may attend) in the form the model's attention takes a ready 4D mask: bool for
    sdpa, additive (0 or the dtype's minimum) for eager."""
    kind = attention_implementation(model)
    if kind == "sdpa":
        return allowed
    if kind == "eager":
        dtype = next(unwrap(model).parameters()).dtype
        return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(~allowed,
                                                                                          torch.finfo(dtype).min)
    raise ValueError(f"policy.forward: layout 'shared_prompts' needs one of the attention implementations "
                     f"{MASKED_ATTENTION}, the model uses {kind!r} (model.attn_implementation)")


def fusable_head(model: torch.nn.Module) -> torch.nn.Linear | None:
    """The LM head module when the fused path applies to `model` (possibly wrapped: DDP, DeepSpeed, PEFT, value
    head, adapter-disabled reference): a plain nn.Linear whose weight is not ZeRO-3 partitioned; else None."""
    lm = language_model(unwrap(model))
    head = lm.get_output_embeddings() if hasattr(lm, "get_output_embeddings") else None
    if type(head) is not torch.nn.Linear or is_partitioned(head.weight):
        return None
    return head


@contextlib.contextmanager
def _capture_input(head: torch.nn.Module | None):
    """While active, the head's input is recorded and the head is handed an empty slice of it (so it projects
    nothing); yields the list of recorded inputs. A no-op for `head=None`."""
    seen: list[Tensor] = []
    if head is None:
        yield seen
        return

    def hook(_module, args):
        seen.append(args[0])
        return (args[0][:, :0],) + tuple(args[1:])

    handle = head.register_forward_pre_hook(hook)
    try:
        yield seen
    finally:
        handle.remove()
    if len(seen) != 1:
        raise RuntimeError(f"policy.forward: expected one call of the LM head, saw {len(seen)}")


def _keeps_logits(model: torch.nn.Module) -> bool:
    """Whether the (unwrapped) model's forward takes transformers' `logits_to_keep`."""
    return _forward_takes_logits_to_keep(type(language_model(unwrap(model))))


@functools.cache
def _forward_takes_logits_to_keep(cls: type) -> bool:
    return "logits_to_keep" in inspect.signature(cls.forward).parameters
