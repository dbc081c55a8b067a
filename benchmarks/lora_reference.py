"""Memory of the reference policy under LoRA: the adapter-disabled base (posttrain's) against a frozen copy.

    .venv/bin/python benchmarks/lora_reference.py            # the 0.5B shape of benchmarks/qwen_shape.py, float32

Each variant runs in a fresh process: load the policy with LoRA adapters (r 16, all-linear), page its weights in
with one small forward, build pi_ref as a stage start does (adapters at B = 0), move the policy's adapters (B set
non-zero, as training does), run one no-grad reference pass over 4 x 256 tokens, and report the growth of the
resident-memory high-water mark (VmHWM) and of the resident set from before pi_ref was built:
    adapter-off   posttrain.models.AdapterDisabledReference: the policy's PeftModel under disable_adapter()
    frozen-copy   posttrain.models.frozen_copy of the PeftModel: a second set of weights
Both give the base model's log-probs (checked against each other).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

PROBE = textwrap.dedent("""
    import json, sys, torch
    sys.path.insert(0, "benchmarks")
    from qwen_shape import model_dir
    from posttrain.experience import Experience
    from posttrain.models import AdapterDisabledReference, LoraSettings, ModelConfig, frozen_copy, load_model
    from posttrain.policy import forward
    path = str(model_dir())
    policy = load_model(path, ModelConfig(path=path, lora=LoraSettings(r=16, alpha=32)))
    torch.manual_seed(0)
    ids = torch.randint(0, 151_000, (4, 257))
    exp = Experience(input_ids=ids, attention_mask=torch.ones_like(ids), loss_mask=torch.ones_like(ids), source=ids)
    with torch.no_grad():                       # page in the memory-mapped weights, warm the code paths
        forward(policy, exp.select(slice(0, 1)))
    peak = lambda: int(open("/proc/self/status").read().split("VmHWM:")[1].split()[0]) * 1024
    rss = lambda: int(open("/proc/self/status").read().split("VmRSS:")[1].split()[0]) * 1024
    before, held = peak(), rss()
    ref = AdapterDisabledReference(policy) if sys.argv[1] == "adapter-off" else frozen_copy(policy)   # stage start
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.01)             # the policy trains on: its adapters move away from B = 0
        out = forward(ref, exp)
    print(json.dumps({"peak": peak() - before, "held": rss() - held,
                      "logprob_sum": float(out.logprobs.double().sum())}))
""")


def main() -> None:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    sys.path.insert(0, os.path.join(root, "benchmarks"))
    from qwen_shape import model_dir

    model_dir()
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    print(f"uptime: {os.popen('uptime').read().strip()}")
    results = {}
    for variant in ("adapter-off", "frozen-copy"):
        out = subprocess.run([sys.executable, "-c", PROBE, variant], capture_output=True, text=True, env=env,
                             cwd=root, check=True)
        results[variant] = json.loads(out.stdout.strip().splitlines()[-1])
        r = results[variant]
        print(f"{variant:12s} peak +{r['peak'] / 2**20:7.0f} MiB, held after the pass +{r['held'] / 2**20:7.0f} MiB, "
              f"sum of log-probs {r['logprob_sum']:.6f}", flush=True)
    saved = results["frozen-copy"]["peak"] - results["adapter-off"]["peak"]
    print(f"saved by the adapter-disabled reference: {saved / 2**20:.0f} MiB of peak")


if __name__ == "__main__":
    main()
