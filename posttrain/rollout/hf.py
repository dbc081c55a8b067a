"""The `hf` rollout engine: batched sampling with transformers `generate` from the live policy (the CPU path).

One call:
    prompts (+ prefixes) -> each repeated n times -> chunks of `batch_size` prompts -> left-padded [B, S] batches
    -> model.generate with the KV cache on, whose *last logits processor is our sampler*
    -> per row: the generated tokens cut after the first EOS / stop string, their log-probs, the finish reason.

The sampler. `generate` drives the decoding loop (KV cache, position ids under left padding, EOS bookkeeping) in
greedy mode; `_Sampler`, the last logits processor, receives the model's float32 next-token logits z, applies
temperature -> top-k -> top-p (transformers' own warpers), draws the token itself and returns scores whose argmax is
that token. So the recorded log-probability is by construction the one of the distribution the token was drawn
from, and a seeded call draws from its own `torch.Generator`, leaving the trainer's global RNG stream untouched
(seed None draws from the global RNG). See `Completion` (rollout/base.py) for what `logprobs` and `raw_logprobs`
mean and which one is pi_old.

Completions. `token_ids` run up to and including the first EOS, or up to and including the token that completes the
first stop string, else to `max_new_tokens` ("length"). Stop strings are searched in the generated text only (not in
prompt or prefix), decoded as `text` is (special tokens skipped); `text` decodes exactly `token_ids`, so it may run
past the stop string by the rest of that last token. The same seed, prompts, `n` and `batch_size` give the same
completions (on one device type and library versions: the chunking decides which rows share a random stream).

Nothing but `SamplingConfig` shapes the distribution: `generate` would fill every unset setting from the
checkpoint's generation_config.json (Qwen2.5-Instruct ships repetition_penalty 1.05, top_k 20, top_p 0.8,
temperature 0.7), so the model's `generation_config` is swapped for a blank one during the call. EOS =
`posttrain.models.eos_token_ids` (the tokenizer's eos token plus every eos id of the model's generation config; Qwen:
<|im_end|> and <|endoftext|>), read once at construction.

Weights. No copy: the engine calls `generate` on the policy module itself, in eval mode (each submodule's training
flag restored afterwards), under `torch.no_grad`, with `use_cache=True` whatever `model.config.use_cache` says
(gradient checkpointing sets it False; in eval mode checkpointing is inactive). DDP and accelerate wrappers are
removed with `accelerator.unwrap_model` (which keeps a mixed-precision autocast forward). Under DeepSpeed ZeRO-3
each rank holds a shard of every weight:
  zero3_gather: true   all weights are gathered once per `generate` call (`deepspeed.zero.GatheredParameters`) and
                       ZeRO-3's per-module fetch/release hooks are detached meanwhile (they would otherwise re-fetch
                       and release the gathered weights at every forward) and re-registered afterwards, even on error;
                       then ranks decode independently (synced_gpus off). Every rank holds the full model for the
                       call. The gather is a collective: all ranks must call `generate` together.
  zero3_gather: false  ZeRO-3's hooks fetch each layer's shard at every forward (slow; little memory). Every forward
                       is then a collective, so `generate` runs with synced_gpus=True (finished ranks keep stepping)
                       and all ranks must pass the same number of prompts (the same number of chunks).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import Tensor

from posttrain.configlib import build, field_doc, require
from posttrain.models import eos_token_ids, is_zero3, unwrap
from posttrain.rollout.base import ENGINES, Completion, SamplingConfig, prompt_contexts


@dataclass(frozen=True)
class HFEngineConfig:
    """Settings of the `hf` rollout engine (a recipe's `rollout:` section)."""

    batch_size: int = field_doc(64, "prompts per transformers generate call; each call decodes batch_size * n "
                                    "sequences, left-padded to the longest prompt (+ prefix) of the chunk")
    shared_prefill: bool = field_doc(False, "run each prompt's forward once per group, not once per sample: the "
                                            "prompts' KV cache is computed for the chunk's distinct prompts and "
                                            "repeated n times (same tokens and log-probs; off under ZeRO-3 "
                                            "without zero3_gather)")
    zero3_gather: bool = field_doc(True, "DeepSpeed ZeRO-3 only: gather all weights once per generate call (fast; "
                                         "each GPU holds the full model meanwhile); false: fetch layer by layer at "
                                         "every forward (slow, little memory)")

    def check(self) -> None:
        require(self.batch_size >= 1, "batch_size", f"must be >= 1, got {self.batch_size}")


class HFEngine:
    """Samples from the live policy with transformers `generate`; see the module docstring."""

    name = "hf"

    def __init__(self, model: torch.nn.Module, tokenizer, config: HFEngineConfig = HFEngineConfig(), accelerator=None):
        self.model, self.tokenizer, self.config, self.accelerator = model, tokenizer, config, accelerator
        self.eos_ids = eos_token_ids(tokenizer, unwrap(model, accelerator))
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_ids[0]

    def generate(self, prompts: list[list[int]], sampling: SamplingConfig,
                 prefixes: list[list[int]] | None = None) -> list[list[Completion]]:
        """`len(prompts)` lists of `sampling.n` completions; with `prefixes`, each continues prompt i + prefix i."""
        sampling.check()
        contexts = prompt_contexts(prompts, prefixes)
        results: list[list[Completion]] = [[] for _ in prompts]
        weights = _generation_module(self.model, self.accelerator, self.config.zero3_gather)
        with torch.no_grad(), weights as (module, synced):   # under ZeRO-3 a collective: every process enters
            if not prompts:
                return results
            device = self.accelerator.device if self.accelerator is not None else next(module.parameters()).device
            generator = None if sampling.seed is None else torch.Generator(device=device).manual_seed(sampling.seed)
            with _eval_mode(module), _blank_generation_config(module):
                step = self.config.batch_size
                for start in range(0, len(contexts), step):
                    rows = [i for i in range(start, min(start + step, len(contexts))) for _ in range(sampling.n)]
                    chunk = self._generate_rows(module, [contexts[i] for i in rows], sampling, generator, device,
                                                synced, sampling.n)
                    for i, completion in zip(rows, chunk):
                        completion.prompt_index = i
                        results[i].append(completion)
        return results

    def _generate_rows(self, module, contexts: list[list[int]], sampling: SamplingConfig, generator,
                       device: torch.device, synced_gpus: bool, group: int = 1) -> list[Completion]:
        """Sample one completion per context; `group` consecutive contexts are the same prompt (+ prefix)."""
        from transformers import GenerationConfig, LogitsProcessorList, StoppingCriteriaList

        width = max(len(c) for c in contexts)
        input_ids = torch.full((len(contexts), width), self.pad_id, dtype=torch.long)          # [B, S] left-padded
        attention = torch.zeros((len(contexts), width), dtype=torch.long)                     # [B, S]
        for r, ids in enumerate(contexts):
            input_ids[r, width - len(ids):] = torch.tensor(ids, dtype=torch.long)
            attention[r, width - len(ids):] = 1
        sampler = _Sampler(sampling, generator)
        stops = _StopStrings(self.tokenizer, sampling.stop, width, self.eos_ids) if sampling.stop else None
        gen_config = GenerationConfig(do_sample=False, num_beams=1, max_new_tokens=sampling.max_new_tokens,
                                      eos_token_id=self.eos_ids, pad_token_id=self.pad_id, use_cache=True)
        input_ids, attention = input_ids.to(device), attention.to(device)
        shared = self.config.shared_prefill and group > 1 and not synced_gpus and width > 1
        cache = {"cache": _shared_prefill(module, input_ids, attention, group)} if shared else {}
        out = module.generate(input_ids=input_ids, attention_mask=attention, generation_config=gen_config,
                              logits_processor=LogitsProcessorList([sampler]),
                              stopping_criteria=StoppingCriteriaList([stops] if stops else []),
                              synced_gpus=synced_gpus, **cache)
        generated = out[:, width:].cpu()                                      # [B, N] padded after each row's end
        tokens, logprobs, raw = (t[:, : generated.shape[1]] for t in sampler.stacked())      # [B, N] each
        eos = torch.isin(generated, torch.tensor(self.eos_ids))                              # [B, N]
        completions = []
        for r in range(len(contexts)):
            end, reason = generated.shape[1], "length"
            hits = eos[r].nonzero()
            if len(hits):
                end, reason = int(hits[0]) + 1, "stop"
            if stops is not None and 0 < stops.hit_at[r] <= end:
                end, reason = stops.hit_at[r], "stop"
            ids = generated[r, :end].tolist()
            if ids != tokens[r, :end].tolist():
                raise RuntimeError("transformers generate emitted tokens other than the ones posttrain's sampler drew "
                                   "(a logits processor ran after it?); the recorded log-probs would be wrong")
            completions.append(Completion(token_ids=ids, text=self.tokenizer.decode(ids, skip_special_tokens=True),
                                          logprobs=logprobs[r, :end].tolist(), finish_reason=reason,
                                          raw_logprobs=raw[r, :end].tolist()))
        return completions

    def sync_weights(self, model) -> None:
        """Nothing to copy: `generate` samples from the live module. Rebinds the engine if given another object."""
        self.model = model

    def close(self) -> None:
        self.model = None


def _shared_prefill(module, input_ids: Tensor, attention: Tensor, group: int):
    """The KV cache of every row's first S - 1 context tokens, computed once per group of `group` identical rows and
    repeated: `generate` then runs only the last context token and the new ones. Position ids are those `generate`
    gives left-padded rows (cumulative count of real tokens), so every row sees exactly what it would unshared."""
    from transformers import DynamicCache

    distinct, mask = input_ids[::group, :-1], attention[::group, :-1]                     # [B / group, S - 1]
    cache = DynamicCache(config=module.config)
    module(input_ids=distinct, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
           cache=cache, use_cache=True, logits_to_keep=1)
    cache.batch_repeat_interleave(group)                                                  # [B, ..., S - 1, ...]
    return cache


class _Sampler:
    """The last logits processor of `generate`: draws each next token itself and records its log-probabilities.

    Input: [B, V] float32 logits z of the next token (nothing applied before: the generation config is blank).
    Output: scores that are 0 at the drawn token and -inf elsewhere, so generate's greedy argmax emits that token.
    """

    def __init__(self, sampling: SamplingConfig, generator: torch.Generator | None):
        from transformers import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

        self.greedy = sampling.temperature == 0
        self.generator = generator
        self.warpers = [TemperatureLogitsWarper(sampling.temperature)] if sampling.temperature not in (0, 1) else []
        if sampling.top_k > 0:
            self.warpers.append(TopKLogitsWarper(top_k=sampling.top_k))
        if sampling.top_p < 1.0:
            self.warpers.append(TopPLogitsWarper(top_p=sampling.top_p))
        self.steps: list[tuple[Tensor, Tensor, Tensor]] = []   # per decoding step: token, logprob, raw logprob [B]

    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        scores = scores.float()                                                # no copy: generate passes float32
        raw = torch.log_softmax(scores, dim=-1)                                        # [B, V] log pi(. | s_t), T = 1
        if self.greedy:
            token = raw.argmax(dim=-1)                                                 # [B]
            logprob = torch.zeros(token.shape, dtype=torch.float32, device=token.device)  # point mass: log 1
        else:
            warped = scores
            for warp in self.warpers:                                                  # z / T -> top-k -> top-p
                warped = warp(input_ids, warped)
            sample_lp = torch.log_softmax(warped, dim=-1) if self.warpers else raw     # [B, V] log p_sample(. | s_t)
            token = torch.multinomial(sample_lp.exp(), 1, generator=self.generator).squeeze(-1)  # [B]
            logprob = sample_lp.gather(-1, token[:, None]).squeeze(-1)                 # [B]
        self.steps.append((token, logprob, raw.gather(-1, token[:, None]).squeeze(-1)))
        forced = torch.full_like(scores, float("-inf"))
        return forced.scatter_(-1, token[:, None], 0.0)                                # [B, V] argmax = token

    def stacked(self) -> tuple[Tensor, Tensor, Tensor]:
        """[B, steps] tokens, sampling log-probs, raw log-probs (on the CPU)."""
        return tuple(torch.stack(column, dim=1).cpu() for column in zip(*self.steps))


class _StopStrings:
    """A stopping criterion: a row ends once its *generated* text contains a stop string.

    The text is decoded as `Completion.text` is (special tokens skipped); prompt and prefix are not searched, as in
    vLLM. Each step decodes only a tail window of each live row: an occurrence that first appears ends in the newest
    token and overlaps at most len(stop in UTF-8 bytes) tokens. `hit_at[r]` is the generated length at which row r's
    first stop string completed (0 = none), so the completion keeps the token that completes it.
    """

    def __init__(self, tokenizer, stops: list[str], prompt_width: int, eos_ids: list[int]):
        self.tokenizer, self.stops, self.prompt_width = tokenizer, list(stops), prompt_width
        self.window = max(len(s.encode("utf-8")) for s in self.stops) + 8   # + margin for skipped special tokens
        self.eos_ids = torch.tensor(eos_ids)
        self.hit_at: list[int] = []
        self.ended: Tensor | None = None                                     # [B] rows past an EOS

    def __call__(self, input_ids: Tensor, scores=None, **kwargs) -> Tensor:
        generated = input_ids[:, self.prompt_width:].cpu()                  # [B, n]
        n = generated.shape[1]
        if self.ended is None:
            self.hit_at, self.ended = [0] * len(generated), torch.zeros(len(generated), dtype=torch.bool)
        self.ended |= torch.isin(generated[:, -1], self.eos_ids)
        for r, tail in enumerate(generated[:, -self.window:].tolist()):
            if self.hit_at[r] or self.ended[r]:
                continue
            text = self.tokenizer.decode(tail, skip_special_tokens=True)
            if any(s in text for s in self.stops):
                self.hit_at[r] = n
        return torch.tensor([h > 0 for h in self.hit_at], device=input_ids.device)


@contextlib.contextmanager
def _generation_module(model, accelerator, zero3_gather: bool) -> Iterator[tuple[torch.nn.Module, bool]]:
    """(module to call generate on, synced_gpus) with the full weights usable for generation."""
    module = unwrap(model, accelerator)
    if not is_zero3(module):
        yield module, False
        return
    if not zero3_gather:
        yield module, True
        return
    import deepspeed

    offload = _zero3_hooks_owner(model, accelerator)
    with deepspeed.zero.GatheredParameters(list(module.parameters())):
        for hook in offload.forward_hooks + offload.backward_hooks:
            hook.remove()
        offload.forward_hooks, offload.backward_hooks = [], []
        try:
            yield module, False
        finally:
            offload._register_deepspeed_module(offload.module)


def _zero3_hooks_owner(model, accelerator):
    """DeepSpeed's object holding the ZeRO-3 fetch/release module hooks of the policy (DeepSpeedZeRoOffload)."""
    from deepspeed import DeepSpeedEngine

    engine = model if isinstance(model, DeepSpeedEngine) else None
    if engine is None and accelerator is not None and getattr(accelerator, "deepspeed_engine_wrapped", None):
        engine = accelerator.deepspeed_engine_wrapped.engine
    optimizer = getattr(engine, "optimizer", None)
    owner = getattr(optimizer, "parameter_offload", optimizer)
    if not all(hasattr(owner, a) for a in ("forward_hooks", "backward_hooks", "_register_deepspeed_module", "module")):
        raise RuntimeError("hf rollout engine: the policy's parameters are ZeRO-3 partitioned but its DeepSpeed engine "
                           "was not found (pass the accelerator-prepared model and the accelerator), or this DeepSpeed "
                           "version keeps its hooks elsewhere; set rollout.zero3_gather: false to generate with "
                           "ZeRO-3's own per-layer fetching")
    return owner


@contextlib.contextmanager
def _eval_mode(module: torch.nn.Module):
    """Eval mode for generation; every submodule's own training flag restored afterwards."""
    flags = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield
    finally:
        for m, training in flags:
            m.training = training


@contextlib.contextmanager
def _blank_generation_config(module: torch.nn.Module):
    """Hide the checkpoint's generation defaults (penalties, temperature, top-k ...) from generate for the call.

    Every submodule that owns a generation config gets a blank one: wrappers such as PEFT's forward `generate` and
    the attribute to the inner transformers model, which is the one whose config generate reads.
    """
    from transformers import GenerationConfig

    owners = [m for m in module.modules() if isinstance(vars(m).get("generation_config"), GenerationConfig)]
    saved = [m.generation_config for m in owners]
    for m in owners:
        m.generation_config = GenerationConfig()
    try:
        yield
    finally:
        for m, config in zip(owners, saved):
            m.generation_config = config


def make_hf_engine(model, tokenizer, config: dict | HFEngineConfig | None = None, accelerator=None) -> HFEngine:
    """Registry factory: `config` is the recipe's `rollout:` settings for this engine (see HFEngineConfig)."""
    cfg = config if isinstance(config, HFEngineConfig) else build(HFEngineConfig, config or {}, "rollout", "recipe")
    return HFEngine(model, tokenizer, cfg, accelerator)


ENGINES.register("hf", make_hf_engine)
