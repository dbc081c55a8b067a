"""How far one RL update moves a checkpoint: greedy accuracy after a single first Adam step along the GRPO gradient,
against a step of the same size in a random direction.

    python benchmarks/sharpness.py CKPT [CKPT ...] [--sizes 3e-5,1e-4,3e-4,1e-3] [--num-ops 3] [--problems 200]

Adam's first update is lr * sign(gradient) for every parameter (bias-corrected m / sqrt(v) = g / |g|), so an RL stage
at learning rate lr moves each weight by about lr on its first step whatever the gradient's scale. This script
samples one GRPO rollout batch from CKPT (16 prompts x 8 completions at temperature 1, the `steps` reward, group
z-score advantages, as the quickstart's GRPO stage), takes the gradient of the GRPO loss, and reports greedy
`steps` accuracy on held-out 3-step chains after the step  w - size * sign(g)  (the update), w + size * sign(g) and
w + size * (random signs). A checkpoint whose accuracy collapses under the gradient-aligned step but not under the
random one sits in a sharp minimum: an RL stage at that lr first knocks it out of the minimum.
Measured here at size 3e-4 on 200 problems, with the quickstart's SFT stage alone
(`posttrain train recipes/quickstart.yaml 'stages=[{name: sft, objectives: {sft: 1.0}, train: {steps: 300}}]'`):
  constant learning rate (as the quickstart)           0.165 -> update 0.175, reverse 0.07, random 0.17
  the same with `schedule.name=cosine` (annealed to 0)  0.24  -> update 0.005, reverse 0.02, random 0.24
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def held_out(num_ops: int, n: int):
    """The evaluation settings and examples: n held-out chains, greedy, verified by the `steps` reward."""
    from posttrain.config import EvalConfig
    from posttrain.configlib import build
    from posttrain.evaluation import held_out_examples

    task = {"digits": 1, "num_ops": num_ops, "ops": "+-", "num_examples": n}
    cfg = build(EvalConfig, {"data": {"source": "task:arithmetic", "split": "test", "task": task}, "reward": "steps",
                             "num_samples": n, "max_new_tokens": 32, "batch_size": n}, "", "benchmark")
    return cfg, held_out_examples(cfg, "data")


def accuracy(model, tokenizer, cfg, examples) -> float:
    from posttrain.evaluation import greedy_verdicts

    _, correct = greedy_verdicts(model, tokenizer, cfg, examples)
    return sum(correct) / len(correct)


def grpo_gradient(ckpt: str, num_ops: int):
    """The model, its tokenizer and the gradient of one quickstart-style GRPO batch (per parameter name)."""
    from posttrain.config import load_recipe
    from posttrain.objectives.aggregation import aggregate
    from posttrain.policy import forward
    from posttrain.trainer import Trainer, term_mask

    task = json.dumps({"digits": 1, "num_ops": num_ops, "ops": "+-", "num_examples": 2000})
    recipe = load_recipe(REPO / "recipes/quickstart.yaml", [
        f"model.path={ckpt}", "output_dir=/tmp/posttrain-sharpness", "logging.report_to=[]",
        "logging.progress_bar=false", f"data.task={task}", "eval.data=null", "stages.0.train.steps=1"])
    trainer = Trainer(recipe)
    run = trainer.setup_stage(1)
    model = trainer.accelerator.unwrap_model(trainer.model)
    batch, _ = run.rollouts.collect(model, run.ref)
    run.rollouts.close()
    model.train()
    model.zero_grad()
    grpo = run.objectives["grpo"]
    per_token, _ = grpo(forward(model, batch, run.temperature("rollouts")), batch)      # [B, L]
    aggregate(per_token, term_mask(batch, next(iter(grpo.terms.values())).tokens), "seq_mean_token_mean").backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    model.eval()
    return model, trainer.tokenizer, grads


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("ckpts", nargs="+")
    p.add_argument("--sizes", default="3e-5,1e-4,3e-4,1e-3")
    p.add_argument("--num-ops", type=int, default=3)
    p.add_argument("--problems", type=int, default=200)
    args = p.parse_args()
    import torch

    cfg, examples = held_out(args.num_ops, args.problems)
    for ckpt in args.ckpts:
        model, tok, grads = grpo_gradient(ckpt, args.num_ops)
        report = {"ckpt": ckpt, "accuracy": accuracy(model, tok, cfg, examples), "steps": {}}
        noise = torch.Generator().manual_seed(0)
        for size in map(float, args.sizes.split(",")):
            for label in ("update", "reverse", "random"):
                moved = copy.deepcopy(model)
                with torch.no_grad():
                    for name, w in moved.named_parameters():
                        if name not in grads:
                            continue
                        direction = {"update": -torch.sign(grads[name]), "reverse": torch.sign(grads[name]),
                                     "random": torch.sign(torch.randn(w.shape, generator=noise))}[label]
                        w.add_(size * direction)
                report["steps"][f"{label}@{size:g}"] = accuracy(moved, tok, cfg, examples)
        print(json.dumps(report), flush=True)


if __name__ == "__main__":
    main()
