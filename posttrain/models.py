"""Loading the policy, its tokenizer and (only when an objective asks) a frozen reference copy."""
from __future__ import annotations

import copy
import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from posttrain.configlib import ConfigError, field_doc, to_dict
from posttrain.tiny import TinyModelConfig, build_tiny_model

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
WEIGHT_FILES = ("*.safetensors", "pytorch_model*.bin", "*.safetensors.index.json", "*.bin.index.json")


@dataclass(frozen=True)
class ModelConfig:
    """The policy model."""

    path: str = field_doc(doc="'tiny' (the embedded model, built locally), a local directory, or a hub name")
    tokenizer: str | None = field_doc(None, "tokenizer path or hub name (default: the model's)")
    dtype: Literal["float32", "bfloat16", "float16"] = field_doc("float32", "weights' dtype when loaded")
    precision: Literal["fp32", "bf16", "fp16"] = field_doc("fp32", "mixed-precision autocast for training (accelerate)")
    gradient_checkpointing: bool = field_doc(False, "recompute activations in backward to save memory")
    attn_implementation: str | None = field_doc(None, "e.g. sdpa, flash_attention_2, eager (default: transformers')")
    trust_remote_code: bool = field_doc(False, "allow a hub model's own code")
    tiny: TinyModelConfig = field_doc(factory=TinyModelConfig, doc="size of the embedded model when path is 'tiny'")


def resolve_model_path(cfg: ModelConfig, cache_dir: str | Path) -> str:
    """The directory or hub name to load; builds the embedded tiny model once per distinct size config.

    A path that exists, or that cannot be a hub name (`org/name`), must be a model directory: config.json and
    weights (ConfigError naming model.path otherwise). Anything else is left to the hub."""
    if cfg.path != "tiny":
        check_model_dir(cfg.path, "model.path")
        return cfg.path
    key = hashlib.sha256(json.dumps(to_dict(cfg.tiny), sort_keys=True).encode()).hexdigest()[:12]
    out = Path(cache_dir) / f"tiny-{key}"
    if not (out / "config.json").is_file():
        tmp = out.with_name(out.name + f".tmp{id(out)}")
        build_tiny_model(tmp, cfg.tiny)
        try:
            tmp.rename(out)
        except OSError:  # another process built it first
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
    return str(out)


def is_hub_name(path: str) -> bool:
    """Whether `path` can name a hub repository (`name` or `org/name`) rather than only a local path."""
    return re.fullmatch(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?", path) is not None and ".." not in path


def check_model_dir(path: str, key: str) -> None:
    """A local model directory has config.json and weights; a path that cannot be a hub name must be one."""
    local = Path(path).expanduser()
    if not local.exists():
        if not is_hub_name(path):
            raise ConfigError(f"{key}: {path!r} does not exist; expected a model directory (config.json and weights), "
                              "'tiny' (the embedded model) or a hub name such as Qwen/Qwen2.5-0.5B-Instruct")
        return
    if not local.is_dir():
        raise ConfigError(f"{key}: {path!r} is a file; expected a model directory (config.json and weights)")
    if not (local / "config.json").is_file():
        files = sorted(p.name for p in local.iterdir())[:8]
        raise ConfigError(f"{key}: {path!r} is not a model directory: it has no config.json (it holds: "
                          f"{', '.join(files) or 'nothing'})")
    if not any(next(local.glob(pattern), None) for pattern in WEIGHT_FILES):
        raise ConfigError(f"{key}: {path!r} has a config.json but no weights ({', '.join(WEIGHT_FILES)})")


def load_config(path: str, cfg: ModelConfig):
    """The model's transformers config (reads config.json only, no weights)."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(path, trust_remote_code=cfg.trust_remote_code)
    except Exception as e:  # noqa: BLE001  (transformers raises OSError / ValueError / JSON errors)
        raise ConfigError(f"model.path: cannot read the model config of {path!r}: {type(e).__name__}: "
                          f"{str(e).splitlines()[0] if str(e) else ''}") from e


def load_tokenizer(path: str, cfg: ModelConfig):
    from transformers import AutoTokenizer

    key = "model.tokenizer" if cfg.tokenizer else "model.path"
    try:
        tok = AutoTokenizer.from_pretrained(cfg.tokenizer or path, trust_remote_code=cfg.trust_remote_code)
    except Exception as e:  # noqa: BLE001  (a missing or broken tokenizer, or a hub name that cannot be reached)
        raise ConfigError(f"{key}: cannot load the tokenizer of {cfg.tokenizer or path!r}: {type(e).__name__}: "
                          f"{str(e).splitlines()[0] if str(e) else ''}") from e
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    if tok.chat_template is None:
        raise ConfigError(f"{key}: the tokenizer of {cfg.tokenizer or path!r} has no chat template; posttrain formats "
                          "prompts with the tokenizer's chat template (use an instruct/chat checkpoint, or set "
                          "model.tokenizer to a tokenizer that has one)")
    return tok


def load_model(path: str, cfg: ModelConfig) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    kwargs = {"dtype": DTYPES[cfg.dtype], "trust_remote_code": cfg.trust_remote_code}
    if cfg.attn_implementation:
        kwargs["attn_implementation"] = cfg.attn_implementation
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable()
        model.config.use_cache = False
    return model


def frozen_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A frozen reference policy (pi_ref): a deep copy in eval mode with no gradients."""
    ref = copy.deepcopy(model).eval()
    ref.requires_grad_(False)
    return ref
