"""Padding-free forward passes: the real tokens of a padded batch [B, T] laid end to end in R <= B rows of width P
(the longest sequence), each sequence with its own position ids 0..n-1, so the model computes nothing on padding.

    plan_packing(attention_mask [B, T])  first-fit decreasing: each sequence goes into the first packed row with room
                                          for it; the rest of a row is filler (token 0, positions 0, 1, ...).
    pack(x [B, T], packing)          ->  [R, P] (filler: `fill`)
    unpack(y [R, P, ...], packing)   ->  [B, T, ...] (zeros at padding; differentiable in y)

    plan_shared_prompts(attention_mask, prompt_mask, input_ids)   rows that begin with the same prompt share one
                                          copy of it: prompt, then each row's continuation, one after the other

The model sees `input_ids` [R, P] and `position_ids` [R, P] and no attention mask: transformers then finds the
sequences from the position ids (a new sequence wherever the position does not grow by one:
`masking_utils.find_packed_sequence_indices`, the contract of its `DataCollatorWithFlattening`) and masks attention
block-diagonally, causal within each sequence. A filler run starts at position 0, so it is a sequence of its own
that no real token attends to. RoPE depends on relative positions only, so a left-padded row (whose unpacked forward
runs at positions shifted by its padding) gives the same per-token outputs as well.

With shared prompts the layout is no longer sequences end to end, so the plan carries its own attention mask
`attention` [R, 1, P, P] (True = may attend): a token sees the earlier tokens of its own unit (one prompt and the
continuations of every row that begins with it) that are either the prompt or its own row's continuation. A
continuation's positions start where the prompt ends, in every copy, so each row computes exactly what it would
alone. The work saved is the prompt's forward for all but one row of each group of rows sharing it (a rollout
group); the price is attention over the unit's whole width instead of each row's own.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

MASKED_ATTENTION = ("sdpa", "eager")   # transformers attention implementations that take a ready 4D mask


@dataclass(frozen=True)
class Packing:
    batch: tuple[int, int]   # (B, T) of the padded batch
    rows: int                # R packed rows
    width: int               # P = the longest sequence
    source: Tensor           # [N] flat index into [B * T] of every real token, row-major
    target: Tensor           # [N] flat index into [R * P] where that token goes
    position_ids: Tensor     # [R, P] position within its own sequence (filler: 0, 1, ... from the end of the last one)
    attention: Tensor | None = None   # [R, 1, P, P] bool, True = may attend (shared prompts); None: from position_ids


def plan_packing(attention_mask: Tensor) -> Packing:
    """Where each real token (attention_mask 1) of `attention_mask` [B, T] goes in the packed rows. Real tokens of a
    row must be contiguous (right or left padding)."""
    b, t = attention_mask.shape
    mask = attention_mask.bool()
    lengths = mask.sum(-1).tolist()
    width = max(max(lengths), 1)
    start, slots = _first_fit_decreasing(lengths, width)             # sequence -> (packed row, offset)
    rows = max(len(slots), 1)
    position_ids = _filler_positions(slots, width)
    targets = []
    for i in range(b):                                               # in row-major order, as mask.nonzero() is
        if lengths[i]:
            row, offset = start[i]
            flat = row * width + offset + torch.arange(lengths[i])
            targets.append(flat)
            position_ids[flat] = torch.arange(lengths[i])
    device = attention_mask.device
    target = torch.cat(targets) if targets else torch.zeros(0, dtype=torch.long)
    return Packing((b, t), rows, width, mask.flatten().nonzero().squeeze(-1), target.to(device),
                   position_ids.view(rows, width).to(device))


def plan_shared_prompts(attention_mask: Tensor, prompt_mask: Tensor, input_ids: Tensor) -> Packing:
    """Rows of `input_ids` [B, T] whose prompts (their leading real tokens where `prompt_mask` [B, T] is set) are the
    same token for token form a unit: [prompt, continuation of row 1, continuation of row 2, ...]. Units go first-fit
    decreasing into rows as wide as the widest unit. Real tokens of a row must be contiguous."""
    b, t = attention_mask.shape
    real = attention_mask.bool().cpu()
    lengths, starts = real.sum(-1).tolist(), real.int().argmax(-1).tolist()
    prompted = (prompt_mask.bool().cpu() & real).int()                          # [B, T]
    prompt_len = [int(prompted[i, starts[i]:].cumprod(-1).sum()) for i in range(b)]   # leading prompt tokens
    ids = input_ids.cpu()
    units: dict[tuple, list[int]] = {}                                           # prompt tokens -> its rows
    for i in range(b):
        if lengths[i]:
            key = tuple(ids[i, starts[i]:starts[i] + prompt_len[i]].tolist()) if prompt_len[i] else ("row", i)
            units.setdefault(key, []).append(i)
    members = list(units.values())
    sizes = [prompt_len[m[0]] + sum(lengths[i] - prompt_len[i] for i in m) for m in members]
    width = max(sizes, default=1)
    place, slots = _first_fit_decreasing(sizes, width)                           # unit -> (packed row, offset)
    rows = max(len(slots), 1)
    position_ids = _filler_positions(slots, width)
    unit = torch.full((rows * width,), -1, dtype=torch.long)                     # filler: unit -1, sees itself
    branch = torch.zeros(rows * width, dtype=torch.long)                         # 0: the prompt; k + 1: row k's
    sources, targets = [], []
    for u, (row, offset) in place.items():
        base, shared = row * width + offset, prompt_len[members[u][0]]
        unit[base:base + sizes[u]] = u
        position_ids[base:base + shared] = torch.arange(shared)
        cursor = base + shared
        for k, i in enumerate(members[u]):
            rest = lengths[i] - shared
            position_ids[cursor:cursor + rest] = torch.arange(shared, lengths[i])
            branch[cursor:cursor + rest] = k + 1
            sources.append(i * t + starts[i] + torch.arange(lengths[i]))
            targets.append(torch.cat([base + torch.arange(shared), cursor + torch.arange(rest)]))
            cursor += rest
    unit, branch = unit.view(rows, width), branch.view(rows, width)
    causal = torch.ones(width, width, dtype=torch.bool).tril()                   # [P, P] key <= query
    same_unit = unit[:, :, None] == unit[:, None, :]                             # [R, P, P]
    visible = (branch[:, None, :] == 0) | (branch[:, None, :] == branch[:, :, None])   # key is prompt or own branch
    attention = (causal & same_unit & visible)[:, None]                          # [R, 1, P, P]
    device = attention_mask.device
    empty = torch.zeros(0, dtype=torch.long)
    return Packing((b, t), rows, width, torch.cat(sources or [empty]).to(device),
                   torch.cat(targets or [empty]).to(device), position_ids.view(rows, width).to(device),
                   attention.to(device))


def _first_fit_decreasing(sizes: list[int], width: int) -> tuple[dict[int, tuple[int, int]], list[int]]:
    """Items of `sizes` (0: left out), longest first, each into the first row of `width` with room for it ->
    ({item: (row, offset)}, tokens used in each row)."""
    slots: list[int] = []
    place: dict[int, tuple[int, int]] = {}
    for i in sorted(range(len(sizes)), key=lambda i: -sizes[i]):
        if sizes[i] == 0:
            continue
        row = next((r for r, used in enumerate(slots) if used + sizes[i] <= width), len(slots))
        if row == len(slots):
            slots.append(0)
        place[i], slots[row] = (row, slots[row]), slots[row] + sizes[i]
    return place, slots


def _filler_positions(slots: list[int], width: int) -> Tensor:
    """[R * P] position ids with each row's filler (after its `slots[r]` used tokens) numbered 0, 1, ... so that it
    is a sequence of its own; the used part is left 0 for the caller to fill."""
    rows = max(len(slots), 1)
    position_ids = torch.zeros(rows * width, dtype=torch.long)
    for row, used in enumerate(slots):
        position_ids[row * width + used:(row + 1) * width] = torch.arange(width - used)
    return position_ids


def pack(x: Tensor, packing: Packing, fill: int = 0) -> Tensor:
    """[B, T] -> [R, P]: the real tokens' entries at their packed places, `fill` elsewhere."""
    out = x.new_full((packing.rows * packing.width,), fill)
    out[packing.target] = x.flatten()[packing.source]
    return out.view(packing.rows, packing.width)


def unpack(y: Tensor, packing: Packing) -> Tensor:
    """[R, P, ...] -> [B, T, ...]: every real token's entry back at its padded place, zeros at padding."""
    rest = y.shape[2:]
    flat = y.reshape(packing.rows * packing.width, *rest).index_select(0, packing.target)   # [N, ...]
    out = y.new_zeros(packing.batch[0] * packing.batch[1], *rest).index_copy(0, packing.source, flat)
    return out.view(*packing.batch, *rest)
