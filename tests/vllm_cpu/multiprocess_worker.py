"""The colocated engine with `in_process: false`: vLLM's engine core and worker in their own process, weights through
a safetensors file in /dev/shm. Run by test_multiprocess.py in a fresh process (vLLM caches its multiprocessing
setting once an engine ran, so pytest's process cannot host both modes); prints a JSON report.
    python multiprocess_worker.py MODEL_DIR PROMPTS_JSON
"""
import json
import os
import sys

import torch


def main() -> None:
    from helpers import ENGINE, load_policy, teacher_forced
    from transformers import AutoTokenizer

    from posttrain.rollout import ENGINES, SamplingConfig

    path, prompts = sys.argv[1], json.loads(sys.argv[2])
    policy = load_policy(path)
    engine = ENGINES.get("vllm")(policy, AutoTokenizer.from_pretrained(path), {**ENGINE, "in_process": False})
    sampling = SamplingConfig(n=2, max_new_tokens=8, seed=1)

    def worst_gap() -> float:
        out = engine.generate(prompts, sampling)
        return max((torch.tensor(c.logprobs) - teacher_forced(policy, p, c.token_ids)).abs().max().item()
                   for p, group in zip(prompts, out) for c in group)

    report = {"in_process": engine.in_process, "initial": worst_gap()}
    with torch.no_grad():
        for param in policy.parameters():
            param.add_(torch.randn_like(param) * 0.05)
    report["stale"] = worst_gap()
    engine.sync_weights(policy)
    report["after_push"] = worst_gap()
    report["push_seconds"] = engine.last_sync_seconds
    report["shm_left"] = [f for f in os.listdir("/dev/shm") if f.startswith(f"posttrain-weights-{os.getpid()}-")]
    engine.close()
    print("REPORT" + json.dumps(report), flush=True)


if __name__ == "__main__":
    main()
