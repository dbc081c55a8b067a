"""One CPU process under DeepSpeed ZeRO-3 (gloo, world size 1) with a colocated vLLM engine; prints a JSON report.

Run by test_multiprocess.py in a fresh process (torch.distributed / DeepSpeed state must not leak into pytest):
    python zero3_worker.py MODEL_DIR PROMPTS_JSON
The engine is handed the DeepSpeedEngine itself, so every push gathers the partitioned parameters one at a time.
"""
import json
import sys

import torch


def main() -> None:
    import deepspeed
    from helpers import ENGINE, teacher_forced
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.integrations import HfDeepSpeedConfig

    from posttrain.rollout import ENGINES, SamplingConfig

    path, prompts = sys.argv[1], json.loads(sys.argv[2])
    deepspeed.init_distributed(dist_backend="gloo")
    config = {"train_micro_batch_size_per_gpu": 1, "zero_allow_untested_optimizer": True,
              "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
              "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "torch_adam": True}}}
    tok = AutoTokenizer.from_pretrained(path)
    reference = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)   # unsharded copy for teacher forcing
    keep_alive = HfDeepSpeedConfig(config)                                           # from_pretrained partitions now
    ds, _, _, _ = deepspeed.initialize(model=AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32),
                                       model_parameters=None, config=config)
    report = {"partitioned": all(p.numel() == 0 for p in ds.module.parameters())}
    engine = ENGINES.get("vllm")(ds, tok, dict(ENGINE))
    sampling = SamplingConfig(n=2, max_new_tokens=8, seed=1)

    def worst_gap() -> float:
        out = engine.generate(prompts, sampling)
        return max((torch.tensor(c.logprobs) - teacher_forced(reference, p, c.token_ids)).abs().max().item()
                   for p, group in zip(prompts, out) for c in group)

    report["initial"] = worst_gap()
    for _ in range(3):
        ids = torch.tensor([prompts[0]])
        ds.backward(ds(input_ids=ids, labels=ids).loss)
        ds.step()
    with deepspeed.zero.GatheredParameters(list(ds.module.parameters())):
        reference.load_state_dict({k: v.detach().clone() for k, v in ds.module.state_dict().items()})
    report["stale"] = worst_gap()          # vLLM still holds the pre-step weights
    engine.sync_weights(ds)
    report["after_push"] = worst_gap()
    report["partitioned_after"] = all(p.numel() == 0 for p in ds.module.parameters())
    del keep_alive
    print("REPORT" + json.dumps(report), flush=True)


if __name__ == "__main__":
    main()
