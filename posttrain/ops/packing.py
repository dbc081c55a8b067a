"""Padding-free forward passes: the real tokens of a padded batch [B, T] laid end to end in R <= B rows of width P
(the longest sequence), each sequence with its own position ids 0..n-1, so the model computes nothing on padding.

    plan_packing(attention_mask [B, T])  first-fit decreasing: each sequence goes into the first packed row with room
                                          for it; the rest of a row is filler (token 0, positions 0, 1, ...).
    pack(x [B, T], packing)          ->  [R, P] (filler: `fill`)
    unpack(y [R, P, ...], packing)   ->  [B, T, ...] (zeros at padding; differentiable in y)

The model sees `input_ids` [R, P] and `position_ids` [R, P] and no attention mask: transformers then finds the
sequences from the position ids (a new sequence wherever the position does not grow by one:
`masking_utils.find_packed_sequence_indices`, the contract of its `DataCollatorWithFlattening`) and masks attention
block-diagonally, causal within each sequence. A filler run starts at position 0, so it is a sequence of its own
that no real token attends to. RoPE depends on relative positions only, so a left-padded row (whose unpacked forward
runs at positions shifted by its padding) gives the same per-token outputs as well.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class Packing:
    batch: tuple[int, int]   # (B, T) of the padded batch
    rows: int                # R packed rows
    width: int               # P = the longest sequence
    source: Tensor           # [N] flat index into [B * T] of every real token, row-major
    target: Tensor           # [N] flat index into [R * P] where that token goes
    position_ids: Tensor     # [R, P] position within its own sequence (filler: 0, 1, ... from the end of the last one)


def plan_packing(attention_mask: Tensor) -> Packing:
    """Where each real token (attention_mask 1) of `attention_mask` [B, T] goes in the packed rows. Real tokens of a
    row must be contiguous (right or left padding)."""
    b, t = attention_mask.shape
    mask = attention_mask.bool()
    lengths = mask.sum(-1).tolist()
    width = max(max(lengths), 1)
    slots: list[int] = []                                            # tokens used in each packed row
    start: dict[int, tuple[int, int]] = {}                           # sequence -> (packed row, offset)
    for i in sorted(range(b), key=lambda i: -lengths[i]):
        if lengths[i] == 0:
            continue
        row = next((r for r, used in enumerate(slots) if used + lengths[i] <= width), len(slots))
        if row == len(slots):
            slots.append(0)
        start[i], slots[row] = (row, slots[row]), slots[row] + lengths[i]
    rows = max(len(slots), 1)
    position_ids = torch.zeros(rows * width, dtype=torch.long)
    targets = []
    for i in range(b):                                               # in row-major order, as mask.nonzero() is
        if lengths[i]:
            row, offset = start[i]
            flat = row * width + offset + torch.arange(lengths[i])
            targets.append(flat)
            position_ids[flat] = torch.arange(lengths[i])
    for row, used in enumerate(slots):                               # filler: a sequence of its own from position 0
        position_ids[row * width + used:(row + 1) * width] = torch.arange(width - used)
    device = attention_mask.device
    target = torch.cat(targets) if targets else torch.zeros(0, dtype=torch.long)
    return Packing((b, t), rows, width, mask.flatten().nonzero().squeeze(-1), target.to(device),
                   position_ids.view(rows, width).to(device))


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
