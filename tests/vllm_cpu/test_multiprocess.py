"""Engines in their own process: vLLM's worker as a separate process (file transport), and DeepSpeed ZeRO-3.

Each runs a script in a fresh Python: vLLM caches its multiprocessing setting once an engine ran in a process, and
torch.distributed / DeepSpeed state must not leak into the pytest process.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("vllm")
pytestmark = pytest.mark.slow    # a fresh interpreter + vLLM start each: 30-100 s apiece on the shared 2 cores
HERE = Path(__file__).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_report(script: str, model_dir, prompts, **env) -> dict:
    env = {**os.environ, **env, "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, str(HERE / script), str(model_dir), json.dumps(prompts)],
                          env=env, capture_output=True, text=True, timeout=420)
    lines = [x for x in proc.stdout.splitlines() if x.startswith("REPORT")]
    assert proc.returncode == 0 and lines, (proc.stdout[-2000:], proc.stderr[-4000:])
    return json.loads(lines[-1][len("REPORT"):])


def test_separate_vllm_process_gets_weights_through_a_shm_file(model_dir, prompts):
    report = run_report("multiprocess_worker.py", model_dir, prompts[:2], VLLM_ENABLE_V1_MULTIPROCESSING="1")
    assert report["in_process"] is False
    assert report["initial"] < 1e-5          # the push at construction (through the file) reproduced the policy
    assert report["stale"] > 0.1             # the perturbation moved the policy ...
    assert report["after_push"] < 1e-5       # ... and the file push carried it into the other process
    assert report["shm_left"] == []          # the transfer file is removed


def test_zero3_push_gathers_and_matches_the_trainer(model_dir, prompts):
    pytest.importorskip("deepspeed")
    report = run_report("zero3_worker.py", model_dir, prompts[:2], MASTER_ADDR="127.0.0.1",
                        MASTER_PORT=str(_free_port()), RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", DS_ACCELERATOR="cpu",
                        VLLM_ENABLE_V1_MULTIPROCESSING="0")
    assert report["partitioned"] and report["partitioned_after"]     # the trainer's shards stay partitioned
    assert report["initial"] < 1e-5                                   # the first push gathered every weight
    assert report["stale"] > 0.5                                      # the optimizer steps moved the policy ...
    assert report["after_push"] < 1e-5                                # ... and the push carried the move to vLLM
