"""Padding-free packing (posttrain/ops/packing.py, train.padding_free): the packed layout by hand, and the packed
forward equal to the padded one in log-probs, entropy, logits, loss and gradients, in the trainer too."""
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from posttrain.experience import Experience
from posttrain.ops.packing import pack, plan_packing, unpack
from posttrain.policy import forward
from posttrain.trainer import train

from conftest import read_metrics, sft_recipe


def test_first_fit_decreasing_layout_by_hand():
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 0, 0]])    # lengths 3, 1, 2
    p = plan_packing(mask)
    # width 3: the 3-token sequence fills row 0; the 2-token one opens row 1, the 1-token one fits after it
    assert (p.rows, p.width) == (2, 3)
    ids = torch.tensor([[11, 12, 13, 0], [21, 0, 0, 0], [31, 32, 0, 0]])
    assert pack(ids, p).tolist() == [[11, 12, 13], [31, 32, 21]]
    assert p.position_ids.tolist() == [[0, 1, 2], [0, 1, 0]]
    assert torch.equal(unpack(pack(ids, p), p), ids * mask)


def test_filler_is_a_sequence_of_its_own_and_left_padding_packs_too():
    mask = torch.tensor([[0, 1, 1], [1, 1, 1], [0, 1, 1]])             # left-padded, lengths 2, 3, 2
    p = plan_packing(mask)
    ids = torch.tensor([[0, 11, 12], [21, 22, 23], [0, 31, 32]])
    assert pack(ids, p, fill=-1).tolist() == [[21, 22, 23], [11, 12, -1], [31, 32, -1]]
    assert p.position_ids.tolist() == [[0, 1, 2], [0, 1, 0], [0, 1, 0]]   # filler restarts at 0: not a continuation
    y = torch.randn(p.rows, p.width, 5, requires_grad=True)
    back = unpack(y, p)                                                 # [B, T, 5]
    assert back.shape == (3, 3, 5) and back[0, 0].abs().sum() == 0 and torch.equal(back[1, 2], y[0, 2])
    back.sum().backward()                                               # only the real tokens' entries get gradient
    assert y.grad[:, 2].sum(-1).tolist() == [5.0, 0.0, 0.0]


def _ragged_batch(vocab: int, left: bool = False) -> Experience:
    torch.manual_seed(0)
    lengths, width = [9, 4, 7, 12, 5, 3], 12
    ids = torch.zeros(len(lengths), width, dtype=torch.long)
    attn = torch.zeros_like(ids)
    for r, n in enumerate(lengths):
        cols = slice(width - n, width) if left else slice(0, n)
        ids[r, cols], attn[r, cols] = torch.randint(3, vocab, (n,)), 1
    loss_mask = attn.clone()                                            # no loss on each row's first token: as a
    loss_mask[torch.arange(len(lengths)), attn.argmax(-1)] = 0          # prompt, it is predicted from nothing
    return Experience(input_ids=ids, attention_mask=attn, loss_mask=loss_mask, source=loss_mask * 2)


def _token_mean_loss(out, exp):
    mask = exp.target_mask                                              # [B, L]
    return -(out.logprobs * mask).sum() / mask.sum()


@pytest.mark.parametrize("fixture", ["tiny_model_dir", "qwen3_model_dir"])
@pytest.mark.parametrize("left", [False, True])
def test_packed_forward_equals_padded(fixture, left, request, one_thread):
    model = AutoModelForCausalLM.from_pretrained(request.getfixturevalue(fixture), dtype=torch.float32)
    exp = _ragged_batch(min(model.config.vocab_size, 500), left)
    grads = []
    for padding_free in (False, True):
        model.zero_grad()
        out = forward(model, exp, temperature=0.7, entropy=True, layout="padding_free" if padding_free else "padded")
        _token_mean_loss(out, exp).backward()
        grads.append({k: p.grad.clone() for k, p in model.named_parameters()})
        mask = exp.target_mask.bool()
        if not padding_free:
            ref_lp, ref_ent, ref_loss = out.logprobs[mask], out.entropy[mask], _token_mean_loss(out, exp)
    assert torch.allclose(out.logprobs[mask], ref_lp, atol=1e-5)
    assert torch.allclose(out.entropy[mask], ref_ent, atol=1e-5)
    assert float(_token_mean_loss(out, exp)) == pytest.approx(float(ref_loss), abs=1e-6)
    for k in grads[0]:
        assert torch.allclose(grads[1][k], grads[0][k], atol=1e-6, rtol=1e-4), k
    with torch.no_grad():                                               # the full-logits path, too
        padded = forward(model, exp, logits=True).logits[mask]
        packed = forward(model, exp, logits=True, layout="padding_free").logits[mask]
    assert torch.allclose(packed, padded, atol=1e-5)


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "model.safetensors"))


RAGGED = ["data.task.digits=2", "data.task.num_ops=3", "data.task.ops=+-", "data.max_length=64",
          "schedule.warmup_steps=0"]


def test_trainer_step_packed_equals_padded_and_accumulates(tiny_model_dir, tmp_path, one_thread):
    """One SFT step: padded 1 x 8, packed 1 x 8 and packed 4 x 2 (gradient accumulation) give the same loss, gradient
    norm and weights."""
    runs = {"padded": ["train.micro_batch_size=8"],
            "packed": ["train.micro_batch_size=8", "train.padding_free=true"],
            "packed_accum": ["train.micro_batch_size=2", "train.padding_free=true"]}
    rows = {}
    for name, extra in runs.items():
        train(sft_recipe(tiny_model_dir, tmp_path / name, steps=1, overrides=RAGGED + extra))
        rows[name] = [r for r in read_metrics(tmp_path / name) if "loss" in r][0]
    w0, ref = _weights(tiny_model_dir), _weights(tmp_path / "padded/final")
    assert max((ref[k] - w0[k]).abs().max().item() for k in w0) > 1e-4          # the step moved the weights
    for name in ("packed", "packed_accum"):
        assert rows[name]["loss"] == pytest.approx(rows["padded"]["loss"], abs=1e-6)
        assert rows[name]["grad_norm"] == pytest.approx(rows["padded"]["grad_norm"], rel=1e-5)
        w = _weights(tmp_path / name / "final")
        # Adam's first step moves every weight by about lr = 1e-3 times the sign of its gradient; summation-order
        # noise in near-zero gradient entries shifts a few of those by far less than that
        assert max((w[k] - ref[k]).abs().max().item() for k in ref) < 2e-5
