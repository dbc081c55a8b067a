"""Cross-check of the RL dynamics against TRL: run TRL's own GRPOTrainer on the tiny model and the arithmetic task
with the same settings as a posttrain GRPO stage, then measure greedy accuracy on the held-out split.

    python benchmarks/trl_grpo_reference.py MODEL_DIR --steps 80 --lr 3e-4 [--num-ops 3] [--out DIR]

Settings mirrored from a posttrain stage: G = 8 completions per prompt, 16 prompts (128 completions) per optimizer
step, one update per batch, temperature 1, max 32 new tokens, beta 0, group z-score advantages, the `exact` reward,
AdamW (no weight decay), cosine schedule with 5 warm-up steps, gradient clipping 1.0. TRL's loss type `grpo`
(per-sequence token mean) corresponds to posttrain's `seq_mean_token_mean` aggregation.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def greedy_accuracy(model, tokenizer, num_ops: int, n: int = 500) -> float:
    """What `posttrain eval` reports (posttrain.evaluation): greedy decoding scored by the `exact` reward."""
    from posttrain.config import EvalConfig
    from posttrain.configlib import build
    from posttrain.evaluation import greedy_verdicts, held_out_examples

    task = {"digits": 1, "num_ops": num_ops, "ops": "+-", "num_examples": n}
    cfg = build(EvalConfig, {"data": {"source": "task:arithmetic", "split": "test", "task": task}, "reward": "exact",
                             "num_samples": n, "max_new_tokens": 32, "batch_size": 250}, "", "benchmark")
    _, correct = greedy_verdicts(model, tokenizer, cfg, held_out_examples(cfg, "data"))
    return sum(correct) / len(correct)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model")
    p.add_argument("--steps", type=int, default=80)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--num-ops", type=int, default=3)
    p.add_argument("--loss-type", default="grpo")
    p.add_argument("--schedule", default="cosine")
    p.add_argument("--warmup-steps", type=int, default=5)
    p.add_argument("--out", default="/tmp/trl-grpo-reference")
    args = p.parse_args()

    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    from posttrain.rewards import exact
    from posttrain.tasks.arithmetic import ArithmeticConfig, generate

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model)
    before = greedy_accuracy(model, tokenizer, args.num_ops)
    rows = generate(ArithmeticConfig(digits=1, num_ops=args.num_ops, ops="+-", num_examples=20000))
    data = Dataset.from_list([{"prompt": [{"role": "user", "content": r["question"]}], "answer": r["answer"]}
                              for r in rows])

    def exact_reward(prompts, completions, answer, **kwargs):
        return exact(prompts, [c[0]["content"] for c in completions], answer=answer)

    config = GRPOConfig(
        output_dir=args.out, max_steps=args.steps, learning_rate=args.lr, weight_decay=0.0, adam_beta2=0.95,
        lr_scheduler_type=args.schedule, warmup_steps=args.warmup_steps, max_grad_norm=1.0,
        per_device_train_batch_size=128,
        num_generations=8, max_completion_length=32, temperature=1.0, beta=0.0, loss_type=args.loss_type,
        scale_rewards="group", use_cpu=True, bf16=False, logging_steps=10, report_to=[], save_strategy="no",
        seed=0)
    trainer = GRPOTrainer(model=model, reward_funcs=[exact_reward], args=config, train_dataset=data,
                          processing_class=tokenizer)
    trainer.train()
    rewards = [round(h["reward"], 3) for h in trainer.state.log_history if "reward" in h]
    entropy = [round(h["entropy"], 3) for h in trainer.state.log_history if "entropy" in h]
    after = greedy_accuracy(trainer.model, tokenizer, args.num_ops)
    print(json.dumps({"greedy_accuracy_before": before, "greedy_accuracy_after": after, "reward_every_10": rewards,
                      "entropy_every_10": entropy, "steps": args.steps, "lr": args.lr, "schedule": args.schedule,
                      "loss_type": args.loss_type}))


if __name__ == "__main__":
    main()
