"""SFT: the hand-computed loss of a 3-token example, and the completion mask of real chat-templated data."""
import math

import pytest
import torch

from posttrain.data import DataConfig, collate_demos, to_examples, tokenize_demos
from posttrain.experience import DEMO, PROMPT, Experience
from posttrain.objectives import Normalizer, aggregate, build_objective
from posttrain.objectives.sft import SFTConfig
from posttrain.ops.logprobs import selective_log_softmax
from posttrain.policy import PolicyOutput


def test_sft_loss_by_hand():
    # Vocabulary of 3. Sequence [p, a, b]: p is the prompt, a and b the completion (targets at positions 0, 1).
    # Logits at position 0 (predicting a=1): [0, ln 2, 0] -> p(a) = 2 / (1 + 2 + 1) = 0.5
    # Logits at position 1 (predicting b=2): [0, 0, ln 3] -> p(b) = 3 / (1 + 1 + 3) = 0.6
    # token_mean SFT = -(ln 0.5 + ln 0.6) / 2 = (0.693147 + 0.510826) / 2 = 0.601986
    logits = torch.tensor([[[0.0, math.log(2), 0.0], [0.0, 0.0, math.log(3)]]])      # [1, 2, 3]
    exp = Experience(input_ids=torch.tensor([[0, 1, 2]]), attention_mask=torch.ones(1, 3, dtype=torch.long),
                     loss_mask=torch.tensor([[0, 1, 1]]), source=torch.tensor([[PROMPT, DEMO, DEMO]]))
    out = PolicyOutput(logits=logits, logprobs=selective_log_softmax(logits, exp.targets))
    sft = build_objective(SFTConfig(type="sft"))
    per_token, _ = sft(out, exp)
    assert per_token.tolist()[0] == pytest.approx([0.693147, 0.510826], abs=1e-6)
    assert aggregate(per_token, exp.target_mask, "token_mean").item() == pytest.approx(0.601986, abs=1e-6)
    # the prompt token carries no loss: masking position 0 leaves only -ln 0.6
    exp.loss_mask = torch.tensor([[0, 0, 1]])
    assert aggregate(per_token, exp.target_mask, "token_mean").item() == pytest.approx(0.510826, abs=1e-6)


def test_completion_mask_is_exactly_the_completion(tiny_tokenizer):
    tok = tiny_tokenizer
    rows = [{"q": "What is 1 + 2?", "s": "1+2=3\n#### 3"}, {"q": "What is 10 - 7?", "s": "10-7=3\n#### 3"}]
    cfg = DataConfig(source="inline", columns={"prompt": "q", "completion": "s"})
    items, stats = tokenize_demos(to_examples(rows, dict(cfg.columns), cfg), tok, cfg)
    exp = collate_demos(items, tok.pad_token_id)
    for i, row in enumerate(rows):
        prompt = tok.apply_chat_template([{"role": "user", "content": row["q"]}], add_generation_prompt=True,
                                         tokenize=False)
        n_prompt = len(tok(prompt, add_special_tokens=False)["input_ids"])
        masked = exp.input_ids[i][exp.loss_mask[i].bool()].tolist()
        # the loss tokens decode to exactly the completion and its end-of-turn token (not the newline after it)
        assert tok.decode(masked) == row["s"] + "<|im_end|>"
        assert exp.loss_mask[i, :n_prompt].sum() == 0
        n = int(exp.attention_mask[i].sum())
        assert exp.loss_mask[i, n_prompt : n - 1].all() and exp.loss_mask[i, n - 1:].sum() == 0  # "\n", padding: none
        assert (exp.source[i, n_prompt : n - 1] == DEMO).all()
    assert stats.kept == 2


def test_overlong_policies_are_counted(tiny_tokenizer):
    rows = [{"prompt": "What is 1 + 2?", "completion": "1+2=3\n#### 3" * 20},
            {"prompt": "What is 2 + 2?", "completion": "4"}]
    drop = DataConfig(source="inline", max_length=30, overlong="drop")
    items, stats = tokenize_demos(to_examples(rows, {}, drop), tiny_tokenizer, drop)
    assert (stats.kept, stats.dropped_overlong, stats.truncated) == (1, 1, 0)
    trunc = DataConfig(source="inline", max_length=30, overlong="truncate")
    items, stats = tokenize_demos(to_examples(rows, {}, trunc), tiny_tokenizer, trunc)
    assert (stats.kept, stats.dropped_overlong, stats.truncated) == (2, 0, 1)
    assert len(items[0].input_ids) == 30


def test_aggregations_on_a_ragged_batch_equal_python_loops():
    torch.manual_seed(0)
    loss = torch.rand(3, 5)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 0, 0, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.float32)
    rows = [[loss[i, t].item() for t in range(5) if mask[i, t]] for i in range(3)]
    flat = [x for r in rows for x in r]
    assert aggregate(loss, mask, "token_mean").item() == pytest.approx(sum(flat) / len(flat), rel=1e-6)
    expected = sum(sum(r) / len(r) for r in rows) / 3
    assert aggregate(loss, mask, "seq_mean_token_mean").item() == pytest.approx(expected, rel=1e-6)
    norm = Normalizer.of(mask, max_len=8)
    assert aggregate(loss, mask, "seq_mean_token_sum_norm", norm).item() == pytest.approx(sum(flat) / (3 * 8), rel=1e-6)
    # micro-batches with the global normalizer sum to the full-batch value, for every mode
    for mode in ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm"):
        whole = aggregate(loss, mask, mode, norm)
        parts = sum(aggregate(loss[i : i + 1], mask[i : i + 1], mode, norm) for i in range(3))
        assert parts.item() == pytest.approx(whole.item(), rel=1e-6)
