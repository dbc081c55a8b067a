"""Greedy accuracy of a model on held-out prompts, verified by a reward function."""
from __future__ import annotations

import torch

from posttrain.data import Example


@torch.no_grad()
def greedy_completions(model, tokenizer, prompts: list[list[dict]], max_new_tokens: int, batch_size: int) -> list[str]:
    """Greedy decoding with left padding and the KV cache; returns the completion texts."""
    texts = [tokenizer.apply_chat_template(p, add_generation_prompt=True, tokenize=False) for p in prompts]
    was_training, side = model.training, tokenizer.padding_side
    model.eval()
    tokenizer.padding_side = "left"
    device = next(model.parameters()).device
    out: list[str] = []
    try:
        for i in range(0, len(texts), batch_size):
            enc = tokenizer(texts[i : i + batch_size], return_tensors="pt", padding=True, add_special_tokens=False).to(device)
            gen = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                 eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
            out += tokenizer.batch_decode(gen[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
    return out


def score(reward_fn, examples: list[Example], completions: list[str], threshold: float) -> list[float]:
    """1.0 / 0.0 per example: is the verifier's reward >= threshold? Columns are passed as in TRL."""
    columns = {k: [ex.columns.get(k) for ex in examples] for k in examples[0].columns}
    rewards = reward_fn(prompts=[ex.prompt for ex in examples], completions=completions, **columns)  # TRL's convention
    name = getattr(reward_fn, "__name__", repr(reward_fn))
    if len(rewards) != len(examples):
        raise ValueError(f"reward {name!r} returned {len(rewards)} values for {len(examples)} completions")
    return [1.0 if (r is not None and r >= threshold) else 0.0 for r in rewards]
