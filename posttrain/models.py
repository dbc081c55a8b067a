"""Loading the policy (optionally with LoRA adapters), its tokenizer, its EOS ids, and (only when an objective asks)
the reference policy: a frozen copy, or with LoRA the same model with its adapters disabled.

LoRA (`model.lora`, peft): the base weights are frozen and only the adapters (and `modules_to_save`) train. The
reference policy pi_ref is then the base model itself, run under peft's `disable_adapter()`
(`AdapterDisabledReference`): no second copy of the weights. That is the base checkpoint in every stage, also after a
warm-up stage (without LoRA, pi_ref is the policy at the start of its stage). Checkpoints hold the whole PeftModel
state (adapters, base weights, optimizer state); the final export writes the adapter (peft's format, loadable by
peft or by transformers' `from_pretrained`) and, with `lora.merge`, the merged model in RUN_DIR/final/merged.
"""
from __future__ import annotations

import copy
import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from posttrain.configlib import ConfigError, field_doc, require, to_dict
from posttrain.tiny import TinyModelConfig, build_tiny_model

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
WEIGHT_FILES = ("*.safetensors", "pytorch_model*.bin", "*.safetensors.index.json", "*.bin.index.json")


@dataclass(frozen=True)
class LoraSettings:
    """LoRA adapters through peft: W x + (alpha / r) B A x on each target module; the base weights stay frozen."""

    r: int = field_doc(16, "rank of each adapter")
    alpha: float = field_doc(32.0, "scale numerator: the update is (alpha / r) B A")
    dropout: float = field_doc(0.05, "dropout on the adapters' input (training only)")
    target_modules: list[str] = field_doc(factory=lambda: ["all-linear"], doc="module names (or name suffixes) to "
                                          "adapt; [all-linear] = every linear layer except the LM head (peft's)")
    modules_to_save: list[str] = field_doc(factory=list, doc="modules trained in full beside the adapters and saved "
                                           "with them, e.g. [lm_head]")
    merge: bool = field_doc(False, "the final export also writes the merged model (base + (alpha / r) B A, plain "
                                   "transformers format) to RUN_DIR/final/merged")

    def check(self) -> None:
        require(self.r >= 1, "r", f"must be >= 1, got {self.r}")
        require(self.alpha > 0, "alpha", f"must be > 0, got {self.alpha}")
        require(0 <= self.dropout < 1, "dropout", f"must be in [0, 1), got {self.dropout}")
        require(bool(self.target_modules), "target_modules", "give at least one module name, or [all-linear]")


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
    lora: LoraSettings | None = field_doc(None, "train LoRA adapters instead of every weight (null = full "
                                                "fine-tuning); the reference policy is then the base model")


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


def load_tokenizer(path: str, cfg: ModelConfig, data: dict | None = None):
    """The tokenizer; `data` (key path -> DataConfig) are the recipe's data sections whose prompts it renders: without
    a chat template each must give `prompt_template`."""
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
        for where, d in (data or {}).items():
            if d is not None and d.prompt_template is None:
                raise ConfigError(f"{where}.prompt_template: the tokenizer of {cfg.tokenizer or path!r} has no chat "
                                  "template; give a prompt template with {prompt} (e.g. 'Question: {prompt}\nAnswer:', "
                                  "or R1-Zero's 'A conversation between User and Assistant. ... User: {prompt} "
                                  "Assistant: <think>'), or a tokenizer that has one (model.tokenizer)")
    return tok


def load_model(path: str, cfg: ModelConfig) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    kwargs = {"dtype": DTYPES[cfg.dtype], "trust_remote_code": cfg.trust_remote_code}
    if cfg.attn_implementation:
        kwargs["attn_implementation"] = cfg.attn_implementation
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    if cfg.gradient_checkpointing:
        (getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable)()  # v5 / v4
        model.config.use_cache = False
    if cfg.lora is None:
        return model
    if cfg.gradient_checkpointing:
        model.enable_input_require_grads()          # frozen embeddings: checkpointed blocks need an input with grad
    return with_lora(model, cfg.lora)


def with_lora(model: torch.nn.Module, cfg: LoraSettings) -> torch.nn.Module:
    """`model` as a peft PeftModel with fresh LoRA adapters (B = 0: at first it computes exactly the base model)."""
    from peft import LoraConfig, get_peft_model

    targets = "all-linear" if list(cfg.target_modules) == ["all-linear"] else list(cfg.target_modules)
    config = LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=targets,
                        modules_to_save=list(cfg.modules_to_save) or None, task_type="CAUSAL_LM")
    return get_peft_model(model, config)


def frozen_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A frozen reference policy (pi_ref): a deep copy in eval mode with no gradients."""
    ref = copy.deepcopy(model).eval()
    ref.requires_grad_(False)
    return ref


class AdapterDisabledReference(torch.nn.Module):
    """pi_ref for a LoRA policy: the policy's own PeftModel run under `disable_adapter()`, i.e. the frozen base model,
    in eval mode (no dropout) and without gradients. Holds no weights of its own (the PeftModel is not a submodule,
    so the policy's parameters are not registered twice)."""

    def __init__(self, peft_model: torch.nn.Module):
        super().__init__()
        self.__dict__["peft_model"] = peft_model      # a plain attribute, not a submodule

    def forward(self, **kwargs):
        model = self.peft_model
        flags = [(m, m.training) for m in model.modules()]
        model.eval()
        try:
            with torch.no_grad(), model.disable_adapter():
                return model(**kwargs)
        finally:
            for m, training in flags:
                m.training = training


def is_peft(module) -> bool:
    try:
        from peft import PeftModel
    except ImportError:
        return False
    return isinstance(module, PeftModel)


def unwrap(model: torch.nn.Module, accelerator=None) -> torch.nn.Module:
    """The module inside DDP / DeepSpeed / accelerate wrappers (the same object, not a copy). The one place that
    strips process wrappers; `language_model` then strips the value head, PEFT and the adapter-disabled reference."""
    if accelerator is not None:
        return accelerator.unwrap_model(model)
    while isinstance(model, torch.nn.parallel.DistributedDataParallel) or type(model).__name__ == "DeepSpeedEngine":
        model = model.module
    return model


def is_partitioned(param: torch.Tensor) -> bool:
    """A DeepSpeed ZeRO-3 partitioned parameter (it carries a DeepSpeed id; its local tensor is a shard)."""
    return hasattr(param, "ds_id")


def is_zero3(module: torch.nn.Module) -> bool:
    """Whether any of `module`'s parameters is ZeRO-3 partitioned."""
    return any(is_partitioned(p) for p in module.parameters())


def language_model(module: torch.nn.Module) -> torch.nn.Module:
    """The transformers causal LM inside a value-head wrapper, a PEFT model or an adapter-disabled reference (the
    module whose weights, LM head and generation config are the checkpoint's)."""
    while True:
        if isinstance(module, AdapterDisabledReference):
            module = module.peft_model
        elif hasattr(module, "value_head") and isinstance(getattr(module, "model", None), torch.nn.Module):
            module = module.model
        elif is_peft(module):
            module = module.get_base_model()
        else:
            return module


def eos_token_ids(tokenizer, model: torch.nn.Module) -> list[int]:
    """The ids that end a completion: the tokenizer's EOS plus every EOS id of the model's generation config (Qwen:
    <|im_end|> and <|endoftext|>). `model` may be wrapped (value head, PEFT; not DDP: unwrap that first)."""
    eos = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    gen = getattr(getattr(language_model(model), "generation_config", None), "eos_token_id", None)
    eos |= set(gen if isinstance(gen, (list, tuple)) else [gen] if gen is not None else [])
    if not eos:
        raise ValueError("neither the tokenizer nor the model's generation config names an EOS token; completions "
                         "could only end by stop strings or length")
    return sorted(eos)


def save_merged(model: torch.nn.Module, out: str | Path, tokenizer, is_main: bool = True) -> None:
    """The LoRA policy with its adapters folded in (W + (alpha / r) B A, computed per weight; the live model is not
    merged), saved in plain transformers format with the tokenizer. Every process calls it (ZeRO-3 gathers)."""
    from posttrain.rollout.vllm_engine import iter_weights, weight_entries

    state = {name: tensor.detach().cpu().clone() for name, tensor in iter_weights(weight_entries(model))}
    if is_main:
        language_model(model).save_pretrained(out, state_dict=state)
        tokenizer.save_pretrained(out)
