"""The `vllm-server` rollout engine: rollouts from a vLLM server on other GPUs, weights pushed to it over NCCL.

Protocol: TRL's, used as a dependency, not re-implemented. The server is `trl vllm-serve` (in TRL 1.16 a thin
wrapper that execs vLLM's own OpenAI-compatible server with VLLM_SERVER_DEV_MODE=1, the NCCL weight-transfer
engine `--weight-transfer-config '{"backend": "nccl"}'`, `--logprobs-mode processed_logprobs` and
`--max-logprobs -1`), e.g. on GPUs that training does not use:

    CUDA_VISIBLE_DEVICES=7 trl vllm-serve --model <the policy's checkpoint> --host 0.0.0.0 --port 8000
    CUDA_VISIBLE_DEVICES=0,1,2,3,4,5,6 accelerate launch ... -m posttrain train recipe.yaml rollout.engine=vllm-server

The client is TRL's `trl.generation.vllm_client.VLLMClient` (it imports vLLM's NCCL helpers, so the trainer's
environment needs vLLM too). Every rank talks HTTP to the server for its own prompts; the main process alone joins
the NCCL weight-update group (`init_communicator`) at start-up.

Sampling. One /v1/completions request per prompt (token ids = prompt + prefix), sent concurrently, each with its own
seed (SamplingConfig.seed + i * n, or drawn from torch's global RNG; the server gives the n samples of a request
seeds s, s+1, ...), the EOS ids as `stop_token_ids`, stop strings kept in the output, `logprobs=0`. The
server must run with `--logprobs-mode processed_logprobs` (checked at start-up through its /server_info endpoint):
then `Completion.logprobs` / `raw_logprobs` mean exactly what rollout/base.py and the colocated `vllm` engine say.
TRL's client does not return the finish reason, so it is derived: "stop" when the last token is an EOS id or the
decoded text contains a stop string, else "length" (the budget or the server's max_model_len ran out).

Weights. `sync_weights(model)`: the same HF-named weights as the colocated engine (DDP/accelerate unwrapped, a
value-head wrapper's backbone, LoRA deltas folded in without mutating the model, ZeRO-3 parameters gathered one at a
time on every rank) are streamed by the main process with `VLLMClient.update_named_params` (the server allocates
from the announced names/dtypes/shapes and broadcasts over NCCL into its workers), then the server's prefix cache is
reset and all ranks wait for each other. NCCL needs CUDA: on CPU, `weight_sync: false` gives a generation-only
client and `sync_weights` refuses to pretend.
"""
from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from posttrain.configlib import build, field_doc, require
from posttrain.models import eos_token_ids, is_partitioned, unwrap
from posttrain.rollout.base import ENGINE_REQUIREMENTS, ENGINES, Completion, SamplingConfig, prompt_contexts
from posttrain.rollout.vllm_engine import (
    completion_logprobs,
    first_request_seed,
    import_vllm,
    iter_weights,
    require_vllm,
    weight_entries,
)


@dataclass(frozen=True)
class VLLMServerEngineConfig:
    """Settings of the `vllm-server` rollout engine (a recipe's `rollout:` section)."""

    base_url: str = field_doc("http://127.0.0.1:8000", "the server's address (`trl vllm-serve --host/--port`)")
    group_port: int = field_doc(51216, "TCP port of the NCCL weight-update rendezvous (on the trainer's main node)")
    connection_timeout: float = field_doc(240.0, "seconds to wait for the server to come up")
    max_concurrent_requests: int = field_doc(64, "prompts in flight at once (one HTTP request each)")
    weight_sync: bool = field_doc(True, "push the policy's weights after every optimizer step (NCCL, needs CUDA); "
                                        "false: generation only, the server keeps its own weights")

    def check(self) -> None:
        require(self.base_url.startswith(("http://", "https://")), "base_url",
                f"must start with http:// or https://, got {self.base_url!r}")
        require(self.connection_timeout >= 0, "connection_timeout", f"must be >= 0, got {self.connection_timeout}")
        require(self.max_concurrent_requests >= 1, "max_concurrent_requests",
                f"must be >= 1, got {self.max_concurrent_requests}")


class VLLMServerEngine:
    """Rollouts from a `trl vllm-serve` server through TRL's VLLMClient; see the module docstring."""

    name = "vllm-server"

    def __init__(self, model: torch.nn.Module, tokenizer, config: VLLMServerEngineConfig = VLLMServerEngineConfig(),
                 accelerator=None):
        import_vllm(self.name)
        from trl.generation.vllm_client import VLLMClient

        self.tokenizer, self.config, self.accelerator = tokenizer, config, accelerator
        self.is_main = accelerator is None or accelerator.is_main_process
        self.eos_ids = eos_token_ids(tokenizer, unwrap(model, accelerator))
        if config.weight_sync and not torch.cuda.is_available():
            raise RuntimeError("vllm-server: weight sync goes over NCCL and needs CUDA GPUs; on a machine without "
                               "them set rollout.weight_sync: false (generation only, the server keeps its weights)")
        self.client = VLLMClient(base_url=config.base_url, group_port=config.group_port,
                                 connection_timeout=config.connection_timeout)
        mode = server_logprobs_mode(self.client)
        if mode != "processed_logprobs":
            raise RuntimeError(f"vllm-server at {config.base_url} runs with logprobs_mode {mode!r}; posttrain needs "
                               "'processed_logprobs' (start it with `trl vllm-serve`, or pass `--logprobs-mode "
                               "processed_logprobs` to `vllm serve`)")
        self.last_sync_seconds = 0.0
        if config.weight_sync:
            if self.is_main:
                device = accelerator.device if accelerator is not None else torch.cuda.current_device()
                self.client.init_communicator(device=device)
            self.sync_weights(model)      # start from the live weights, not the server's checkpoint

    def generate(self, prompts: list[list[int]], sampling: SamplingConfig,
                 prefixes: list[list[int]] | None = None) -> list[list[Completion]]:
        """`len(prompts)` lists of `sampling.n` completions; with `prefixes`, each continues prompt i + prefix i."""
        sampling.check()
        contexts = prompt_contexts(prompts, prefixes)
        if not contexts:
            return []
        base_seed = first_request_seed(sampling)
        workers = min(self.config.max_concurrent_requests, len(contexts))
        with ThreadPoolExecutor(max_workers=workers) as pool:
            replies = list(pool.map(lambda i: self._request(contexts[i], sampling, base_seed + i * sampling.n),
                                    range(len(contexts))))
        return [[self._completion(ids, lps, tids, i, sampling)
                 for ids, lps, tids in zip(r["completion_ids"], r["logprobs"], r["logprob_token_ids"])]
                for i, r in enumerate(replies)]

    def _request(self, context: list[int], sampling: SamplingConfig, seed: int) -> dict:
        extra = {"seed": seed % 2**63, "stop_token_ids": list(self.eos_ids), "include_stop_str_in_output": True,
                 "skip_special_tokens": True}
        if sampling.stop:
            extra["stop"] = list(sampling.stop)
        reply = self.client.generate([context], n=sampling.n, temperature=sampling.temperature, top_p=sampling.top_p,
                                     top_k=sampling.top_k, max_tokens=sampling.max_new_tokens, logprobs=0,
                                     generation_kwargs=extra)
        if reply["logprobs"] is None or len(reply["completion_ids"]) != sampling.n:
            raise RuntimeError(f"vllm-server returned {len(reply['completion_ids'])} completions "
                               f"{'without log-probs ' if reply['logprobs'] is None else ''}for n={sampling.n}")
        return reply

    def _completion(self, ids: list[int], lps: list[list[float]], token_ids: list[list[int]], prompt_index: int,
                    sampling: SamplingConfig) -> Completion:
        sampled = []
        for t, (token, values, candidates) in enumerate(zip(ids, lps, token_ids)):
            if token not in candidates:
                raise RuntimeError(f"vllm-server: no log-probability for the sampled token at position {t}")
            sampled.append(float(values[candidates.index(token)]))
        if len(sampled) != len(ids):
            raise RuntimeError("vllm-server: fewer log-probabilities than sampled tokens")
        text = self.tokenizer.decode(ids, skip_special_tokens=True)
        stopped = bool(ids) and (ids[-1] in self.eos_ids or any(s in text for s in sampling.stop))
        logprobs, raw = completion_logprobs(sampled, sampling)
        return Completion(token_ids=list(ids), text=text, logprobs=logprobs,
                          finish_reason="stop" if stopped else "length", prompt_index=prompt_index, raw_logprobs=raw)

    def sync_weights(self, model) -> None:
        """Stream `model`'s weights to the server over NCCL (call on every rank together)."""
        if not self.config.weight_sync:
            raise RuntimeError("vllm-server: rollout.weight_sync is false, so the server cannot receive new weights; "
                               "its samples would come from a stale policy")
        start = time.perf_counter()
        entries = weight_entries(model, self.accelerator)
        if self.is_main:
            metadata = [(e.name, str(e.dtype).removeprefix("torch."), e.shape) for e in entries]
            self.client.update_named_params(metadata, iter_weights(entries))
            self.client.reset_prefix_cache()
        elif any(is_partitioned(p) for e in entries for p in e.gather_params()):
            for _ in iter_weights(entries):   # take part in the ZeRO-3 gathers (collectives)
                pass
        if self.accelerator is not None:
            self.accelerator.wait_for_everyone()  # no rank samples before the server holds the new weights
        self.last_sync_seconds = time.perf_counter() - start

    def close(self) -> None:
        if self.is_main and getattr(self.client, "communicator", None) is not None:
            self.client.close_communicator()


def server_logprobs_mode(client) -> str:
    """The server's `logprobs_mode`, read from its /server_info endpoint (vLLM's dev mode, which TRL turns on)."""
    info = client.get_server_info()
    model_config = info.get("model_config") if isinstance(info, dict) else None
    mode = model_config.get("logprobs_mode") if isinstance(model_config, dict) else None
    if mode is None:
        raise RuntimeError("vllm-server: the server's /server_info does not report model_config.logprobs_mode")
    return mode


def make_vllm_server_engine(model, tokenizer, config: dict | VLLMServerEngineConfig | None = None,
                            accelerator=None) -> VLLMServerEngine:
    """Registry factory: `config` is the recipe's `rollout:` settings for this engine (see VLLMServerEngineConfig)."""
    cfg = config if isinstance(config, VLLMServerEngineConfig) else build(VLLMServerEngineConfig, config or {},
                                                                          "rollout", "recipe")
    return VLLMServerEngine(model, tokenizer, cfg, accelerator)


ENGINES.register("vllm-server", make_vllm_server_engine)
ENGINE_REQUIREMENTS["vllm-server"] = require_vllm
