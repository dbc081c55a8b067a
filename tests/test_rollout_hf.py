"""The `hf` rollout engine: log-probs vs teacher forcing, seeds, EOS / stop strings / length, prefixes, KV cache."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from posttrain.configlib import ConfigError
from posttrain.data import DataConfig, collate_demos, load_rows, to_examples, tokenize_demos
from posttrain.rollout import ENGINES, SamplingConfig, encode_prompts
from posttrain.rollout.hf import HFEngine, HFEngineConfig

TOL = 1e-4


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tensors here are tiny: one intra-op thread is faster, and on a shared CPU two OpenMP threads spin-wait for
    each other (measured 20x slower under load). Restored after this module."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny(tiny_model_dir, one_thread):
    """The session's tiny Qwen2 model trained 40 SFT steps (in memory) on arithmetic: it answers in the task's format
    and emits EOS, so its distributions are far from uniform."""
    path = tiny_model_dir
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    cfg = DataConfig(source="task:arithmetic", task={"digits": 2, "num_ops": 1, "num_examples": 1000}, max_length=64)
    rows, columns = load_rows(cfg)
    examples = to_examples(rows, columns, cfg)
    items, _ = tokenize_demos(examples, tok, cfg)
    torch.manual_seed(0)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(40):
        exp = collate_demos([items[i] for i in torch.randint(len(items), (32,)).tolist()], tok.pad_token_id)
        logits = model(input_ids=exp.input_ids, attention_mask=exp.attention_mask).logits[:, :-1].float()
        logp = torch.log_softmax(logits, -1).gather(-1, exp.targets[..., None]).squeeze(-1)
        loss = -(logp * exp.target_mask).sum() / exp.target_mask.sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    opt.zero_grad(set_to_none=True)
    system = [{"role": "system", "content": "Add or subtract."}]   # on some prompts: lengths differ, rows get padded
    prompts = encode_prompts(tok, [(system if i % 3 == 1 else []) + ex.prompt for i, ex in enumerate(examples[:6])])
    assert max(len(p) for p in prompts) - min(len(p) for p in prompts) >= 5
    return {"path": path, "tok": tok, "model": model, "prompts": prompts, "items": items[:6], "examples": examples[:6]}


def engine(t, **config) -> HFEngine:
    return ENGINES.get("hf")(t["model"], t["tok"], config)


def teacher_forced(model, context: list[int], tokens: list[int], temperature: float = 1.0) -> torch.Tensor:
    """log softmax(z / T)[token] at each of `tokens`, from one unpadded forward pass of context + tokens."""
    with torch.no_grad():
        logits = model(torch.tensor([context + tokens])).logits[0, len(context) - 1 : -1].float()   # [n, V]
    return torch.log_softmax(logits / temperature, -1).gather(-1, torch.tensor(tokens)[:, None]).squeeze(-1)


def reference_truncated(model, context, tokens, temperature, top_k=0, top_p=1.0) -> torch.Tensor:
    """Log-probs under softmax(z / T) restricted to the top-k, then nucleus-p set, renormalised (independent code)."""
    with torch.no_grad():
        z = model(torch.tensor([context + tokens])).logits[0, len(context) - 1 : -1].float() / temperature
    out = []
    for row, tok in zip(z, tokens):
        keep = torch.ones_like(row, dtype=torch.bool)
        if top_k:
            keep &= row >= row.topk(top_k).values[-1]
        probs = torch.softmax(row.masked_fill(~keep, float("-inf")), -1)
        order = probs.argsort(descending=True)
        mass_before = torch.cumsum(probs[order], 0) - probs[order]      # probability strictly above each token
        nucleus = torch.zeros_like(keep)
        nucleus[order] = mass_before < top_p
        kept = row.masked_fill(~(keep & nucleus), float("-inf"))
        out.append(torch.log_softmax(kept, -1)[tok])
    return torch.stack(out)


def check_shapes(c):
    assert len(c.token_ids) == len(c.logprobs) == len(c.raw_logprobs) >= 1
    assert c.finish_reason in ("stop", "length")


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_logprobs_equal_teacher_forcing(tiny, temperature):
    prompts = tiny["prompts"]
    out = engine(tiny, batch_size=4).generate(prompts, SamplingConfig(n=2, temperature=temperature,
                                                                      max_new_tokens=24, seed=3))
    assert [len(g) for g in out] == [2] * len(prompts)
    for i, group in enumerate(out):
        for c in group:
            check_shapes(c)
            assert c.prompt_index == i
            sampled = teacher_forced(tiny["model"], prompts[i], c.token_ids, temperature)
            raw = teacher_forced(tiny["model"], prompts[i], c.token_ids, 1.0)
            torch.testing.assert_close(torch.tensor(c.logprobs), sampled, atol=TOL, rtol=0)
            torch.testing.assert_close(torch.tensor(c.raw_logprobs), raw, atol=TOL, rtol=0)
    if temperature != 1.0:   # the two semantics really differ
        c = out[0][0]
        assert max(abs(a - b) for a, b in zip(c.logprobs, c.raw_logprobs)) > 1e-2


@pytest.mark.parametrize("prefixed", [False, True])
def test_shared_prefill_equals_per_sample_prefill_and_teacher_forcing(tiny, prefixed):
    """shared_prefill: each prompt's KV cache computed once per group of n: the same tokens, log-probs within float
    noise of the unshared engine's, and equal to teacher forcing (left-padded rows of different lengths)."""
    prompts = tiny["prompts"]
    prefixes = [tiny["items"][i].input_ids[len(prompts[i]):][:k] for i, k in enumerate([0, 2, 1, 3, 0, 4])] \
        if prefixed else None
    sampling = SamplingConfig(n=3, temperature=0.9, max_new_tokens=20, seed=7)
    shared = engine(tiny, batch_size=4, shared_prefill=True).generate(prompts, sampling, prefixes=prefixes)
    plain = engine(tiny, batch_size=4).generate(prompts, sampling, prefixes=prefixes)
    for i, (a, b) in enumerate(zip(shared, plain)):
        assert [c.token_ids for c in a] == [c.token_ids for c in b]
        for c, d in zip(a, b):
            check_shapes(c)
            torch.testing.assert_close(torch.tensor(c.logprobs), torch.tensor(d.logprobs), atol=1e-5, rtol=0)
            context = prompts[i] + (prefixes[i] if prefixed else [])
            torch.testing.assert_close(torch.tensor(c.logprobs), teacher_forced(tiny["model"], context, c.token_ids,
                                                                                0.9), atol=TOL, rtol=0)
            torch.testing.assert_close(torch.tensor(c.raw_logprobs), teacher_forced(tiny["model"], context,
                                                                                    c.token_ids), atol=TOL, rtol=0)


@pytest.mark.parametrize("top_k,top_p", [(5, 1.0), (0, 0.8), (4, 0.6)])
def test_top_k_top_p_logprobs_are_the_renormalised_truncated_distribution(tiny, top_k, top_p):
    prompts = tiny["prompts"][:3]
    out = engine(tiny).generate(prompts, SamplingConfig(n=3, temperature=0.9, top_k=top_k, top_p=top_p,
                                                        max_new_tokens=16, seed=0))
    for i, group in enumerate(out):
        for c in group:
            check_shapes(c)
            expected = reference_truncated(tiny["model"], prompts[i], c.token_ids, 0.9, top_k, top_p)
            assert torch.isfinite(expected).all()   # every drawn token lies inside the truncated support
            torch.testing.assert_close(torch.tensor(c.logprobs), expected, atol=TOL, rtol=0)
            raw = teacher_forced(tiny["model"], prompts[i], c.token_ids)
            torch.testing.assert_close(torch.tensor(c.raw_logprobs), raw, atol=TOL, rtol=0)


def test_top_k_1_is_greedy_with_probability_one(tiny):
    prompts = tiny["prompts"][:3]
    greedy = engine(tiny).generate(prompts, SamplingConfig(temperature=0.0, max_new_tokens=20))
    top1 = engine(tiny).generate(prompts, SamplingConfig(temperature=1.3, top_k=1, max_new_tokens=20, seed=9))
    for g, t in zip(greedy, top1):
        assert t[0].token_ids == g[0].token_ids
        assert t[0].logprobs == [0.0] * len(t[0].token_ids)


def test_greedy_matches_plain_transformers_and_padding_does_not_matter(tiny):
    prompts, tok, model = tiny["prompts"], tiny["tok"], tiny["model"]
    one = engine(tiny, batch_size=1).generate(prompts, SamplingConfig(temperature=0.0, max_new_tokens=24))
    many = engine(tiny, batch_size=6).generate(prompts, SamplingConfig(temperature=0.0, max_new_tokens=24))
    for i, (a, b) in enumerate(zip(one, many)):
        assert a[0].token_ids == b[0].token_ids and a[0].finish_reason == b[0].finish_reason
        assert a[0].logprobs == [0.0] * len(a[0].token_ids)       # drawn from a point mass
        torch.testing.assert_close(torch.tensor(b[0].raw_logprobs), teacher_forced(model, prompts[i], b[0].token_ids),
                                   atol=TOL, rtol=0)
        with torch.no_grad():
            plain = model.generate(torch.tensor([prompts[i]]), do_sample=False, max_new_tokens=24,
                                   eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)[0, len(prompts[i]):]
        assert a[0].token_ids == plain.tolist()[: len(a[0].token_ids)]
    assert sum(g[0].finish_reason == "stop" for g in one) >= 1     # the trained model answers and ends


def test_same_seed_same_completions_and_global_rng_untouched(tiny):
    eng, prompts = engine(tiny), tiny["prompts"][:4]
    sampling = SamplingConfig(n=2, temperature=1.0, max_new_tokens=16, seed=11)
    torch.manual_seed(123)
    expected_next = torch.rand(4)
    torch.manual_seed(123)
    a = eng.generate(prompts, sampling)
    assert torch.equal(torch.rand(4), expected_next)                 # a seeded call leaves the global stream alone
    b = eng.generate(prompts, sampling)
    c = eng.generate(prompts, SamplingConfig(n=2, temperature=1.0, max_new_tokens=16, seed=12))
    ids = lambda out: [x.token_ids for g in out for x in g]           # noqa: E731
    assert ids(a) == ids(b)
    assert [x.logprobs for g in a for x in g] == [x.logprobs for g in b for x in g]
    assert ids(a) != ids(c)
    assert len({tuple(x.token_ids) for g in a for x in g}) > 1       # n samples of a prompt are not copies


def test_unseeded_calls_draw_from_the_global_rng(tiny):
    eng, prompts = engine(tiny), tiny["prompts"][:4]
    sampling = SamplingConfig(n=2, temperature=1.0, max_new_tokens=16)
    torch.manual_seed(5)
    a = eng.generate(prompts, sampling)
    b = eng.generate(prompts, sampling)
    torch.manual_seed(5)
    a2 = eng.generate(prompts, sampling)
    ids = lambda out: [x.token_ids for g in out for x in g]           # noqa: E731
    assert ids(a) == ids(a2) and ids(a) != ids(b)


def test_eos_ends_with_stop_and_budget_with_length(tiny):
    eos = tiny["tok"].eos_token_id
    out = engine(tiny).generate(tiny["prompts"], SamplingConfig(n=4, temperature=1.0, max_new_tokens=40, seed=0))
    reasons = set()
    for group in out:
        for c in group:
            check_shapes(c)
            reasons.add(c.finish_reason)
            assert eos not in c.token_ids[:-1]
            if c.finish_reason == "stop":
                assert c.token_ids[-1] == eos
                assert "<|im_end|>" not in c.text
                assert c.text == tiny["tok"].decode(c.token_ids[:-1], skip_special_tokens=True)
            else:
                assert len(c.token_ids) == 40
    assert "stop" in reasons
    short = engine(tiny).generate(tiny["prompts"], SamplingConfig(n=2, temperature=0.0, max_new_tokens=3))
    for group in short:
        for c in group:
            assert (c.finish_reason, len(c.token_ids)) == ("length", 3) and eos not in c.token_ids


def test_stop_strings(tiny):
    eng, prompts, tok = engine(tiny), tiny["prompts"][:4], tiny["tok"]
    reference = [g[0] for g in eng.generate(prompts, SamplingConfig(temperature=0.0, max_new_tokens=30))]
    text = reference[0].text
    assert len(text) >= 6, text
    multi = text[2:5]                                                   # spans several (digit-level) tokens
    assert len(tok(multi, add_special_tokens=False)["input_ids"]) >= 2
    cuts = 0
    for stops in ([text[2]], [multi], [text[-2:], multi], [text[3], "@@@"]):
        stopped = [g[0] for g in eng.generate(prompts, SamplingConfig(temperature=0.0, max_new_tokens=30, stop=stops))]
        for ref, c in zip(reference, stopped):
            check_shapes(c)
            if not any(s in ref.text for s in stops):
                assert c.token_ids == ref.token_ids
                continue
            assert c.finish_reason == "stop"
            assert c.token_ids == ref.token_ids[: len(c.token_ids)]          # a cut of the same greedy answer
            assert any(s in c.text for s in stops)                            # the completing token is kept ...
            shorter = tok.decode(c.token_ids[:-1], skip_special_tokens=True)
            assert not any(s in shorter for s in stops)                       # ... and it is the first occurrence
            cuts += len(c.token_ids) < len(ref.token_ids)
    assert cuts >= 4
    # stop strings are searched in the generated text only: "What" is in every prompt, never in an answer
    assert all("What" not in r.text for r in reference)
    what = SamplingConfig(temperature=0.0, max_new_tokens=30, stop=["What"])
    unaffected = [g[0] for g in eng.generate(prompts, what)]
    assert [c.token_ids for c in unaffected] == [r.token_ids for r in reference]


def test_prefix_continuation(tiny):
    eng, prompts, model = engine(tiny, batch_size=3), tiny["prompts"], tiny["model"]
    reference = [g[0] for g in eng.generate(prompts, SamplingConfig(temperature=0.0, max_new_tokens=30))]
    cut = [0, 1, 3, 5, 2, 4]                                            # includes an empty prefix
    prefixes = [r.token_ids[:k] for r, k in zip(reference, cut)]
    cont = eng.generate(prompts, SamplingConfig(temperature=0.0, max_new_tokens=30), prefixes=prefixes)
    for r, k, g in zip(reference, cut, cont):
        assert g[0].token_ids == r.token_ids[k:][: len(g[0].token_ids)]   # greedy continues exactly where cut
        assert g[0].finish_reason == r.finish_reason or len(g[0].token_ids) == 30
    sampled = eng.generate(prompts, SamplingConfig(n=2, temperature=0.8, max_new_tokens=20, seed=4), prefixes=prefixes)
    for i, group in enumerate(sampled):
        for c in group:
            check_shapes(c)
            context = prompts[i] + prefixes[i]
            torch.testing.assert_close(torch.tensor(c.logprobs), teacher_forced(model, context, c.token_ids, 0.8),
                                       atol=TOL, rtol=0)
            torch.testing.assert_close(torch.tensor(c.raw_logprobs), teacher_forced(model, context, c.token_ids),
                                       atol=TOL, rtol=0)
    with pytest.raises(ValueError, match="prefixes"):
        eng.generate(prompts, SamplingConfig(), prefixes=prefixes[:2])


def test_kv_cache_one_token_per_step_and_model_state_restored(tiny):
    """Decoding cost is linear in new tokens: after the prefill, every forward sees exactly one new token, and its
    output is still the teacher-forced one (a one-token forward can only get that right from cached keys/values).

    Observed through public seams only (a forward pre-hook on the model: the token ids each forward receives; the
    completions' log-probs), not transformers' internal calling convention (the cache's keyword name changed in
    5.24). Run on a fresh copy with gradient checkpointing on and config.use_cache False (what training sets), in
    train mode, with gradients present: generation must still use the cache, run in eval mode without autograd,
    and leave mode, gradients and configs as they were.
    """
    model = AutoModelForCausalLM.from_pretrained(tiny["path"], dtype=torch.float32)
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable  # v5 / v4
    enable()
    model.config.use_cache = False
    model.train()
    model(torch.tensor([tiny["prompts"][0]]), labels=torch.tensor([tiny["prompts"][0]])).loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    gen_config = model.generation_config
    seen = []

    def record(module, args, kwargs):
        ids = kwargs["input_ids"] if "input_ids" in kwargs else args[0]
        seen.append((tuple(ids.shape), module.training, torch.is_grad_enabled()))

    handle = model.register_forward_pre_hook(record, with_kwargs=True)
    try:
        prompts = tiny["prompts"][:4]
        for new_tokens in (8, 32):
            seen.clear()
            out = ENGINES.get("hf")(model, tiny["tok"], {}).generate(
                prompts, SamplingConfig(n=2, temperature=1.0, max_new_tokens=new_tokens, seed=1))
            longest = max(len(c.token_ids) for g in out for c in g)
            width = max(len(p) for p in prompts)
            assert len(seen) == longest                                      # one forward per generated position
            assert seen[0][0] == (8, width)                                  # prefill: the whole prompt once
            assert all(shape == (8, 1) for shape, _, _ in seen[1:])          # then one new token per step
            assert not any(training or grad for _, training, grad in seen)
            assert sum(s[0][1] for s in seen) == width + longest - 1         # tokens fed: linear in new tokens
    finally:
        handle.remove()
    assert model.training and all(m.training for m in model.modules())
    assert torch.is_grad_enabled()
    assert model.config.use_cache is False and model.generation_config is gen_config
    assert all(torch.equal(p.grad, grads[n]) for n, p in model.named_parameters())
    model.eval()
    for i, group in enumerate(out):                                          # the one-token steps saw the whole context
        for c in group:
            expected = teacher_forced(model, prompts[i], c.token_ids)
            torch.testing.assert_close(torch.tensor(c.raw_logprobs), expected, atol=TOL, rtol=0)


def test_checkpoint_generation_defaults_do_not_leak_in(tiny):
    """A checkpoint's generation_config.json (Qwen2.5-Instruct style) must not change what the engine samples."""
    model = AutoModelForCausalLM.from_pretrained(tiny["path"], dtype=torch.float32)
    sampling = SamplingConfig(n=2, temperature=1.0, max_new_tokens=16, seed=2)
    clean = ENGINES.get("hf")(model, tiny["tok"], {}).generate(tiny["prompts"][:3], sampling)
    tok = tiny["tok"]
    model.generation_config = GenerationConfig(do_sample=True, temperature=0.3, top_k=3, top_p=0.5,
                                               repetition_penalty=1.8, no_repeat_ngram_size=2, suppress_tokens=[5, 6],
                                               eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    loud = ENGINES.get("hf")(model, tiny["tok"], {}).generate(tiny["prompts"][:3], sampling)
    assert [c.token_ids for g in clean for c in g] == [c.token_ids for g in loud for c in g]
    for i, group in enumerate(loud):
        for c in group:
            torch.testing.assert_close(torch.tensor(c.logprobs), teacher_forced(model, tiny["prompts"][i], c.token_ids),
                                       atol=TOL, rtol=0)
    assert model.generation_config.repetition_penalty == 1.8                # restored after the call


def test_encode_prompts_matches_the_data_pipeline(tiny):
    ids = encode_prompts(tiny["tok"], [ex.prompt for ex in tiny["examples"]])
    assert ids[0] == tiny["prompts"][0] and ids[1] != tiny["prompts"][1]
    assert ids == [item.input_ids[: item.prompt_len] for item in tiny["items"]]
    assert encode_prompts(tiny["tok"], []) == []


def test_config_registry_and_validation(tiny, capsys):
    from posttrain.cli import main

    assert "hf" in ENGINES
    assert main(["list"]) == 0 and "  hf" in capsys.readouterr().out
    with pytest.raises(ConfigError, match=r"rollout\.bach_size: unknown key; allowed keys here: batch_size, "
                                         r"shared_prefill, zero3_g"):
        ENGINES.get("hf")(tiny["model"], tiny["tok"], {"bach_size": 8})
    with pytest.raises(ConfigError, match=r"rollout\.batch_size: must be >= 1"):
        ENGINES.get("hf")(tiny["model"], tiny["tok"], {"batch_size": 0})
    eng = ENGINES.get("hf")(tiny["model"], tiny["tok"], HFEngineConfig(batch_size=2))
    assert eng.config.batch_size == 2 and eng.name == "hf"
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        eng.generate([[1, 2], []], SamplingConfig())
    with pytest.raises(ValueError, match="temperature"):
        eng.generate([[1, 2]], SamplingConfig(temperature=-1.0))
    with pytest.raises(ValueError, match="stop strings must be non-empty"):
        eng.generate([[1, 2]], SamplingConfig(stop=["</a>", ""]))
    assert eng.generate([], SamplingConfig()) == []
    eng.sync_weights(tiny["model"])                                          # a no-op for live weights
    assert eng.model is tiny["model"]


ZERO3_PROBE = r"""
import json, sys
import torch
import deepspeed
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.integrations import HfDeepSpeedConfig
from posttrain.rollout import ENGINES, SamplingConfig

path, prompts = sys.argv[1], json.loads(sys.argv[2])
import importlib
ds_comm = importlib.import_module("deepspeed.comm.torch")   # (`import ... as` would bind deepspeed.comm's `torch`)
ds_comm.build_shm_op = lambda: None   # a JIT-compiled multi-rank CPU all-reduce speed-up: useless for one rank, and
                                      # loading it waits on the torch-extensions build lock shared machine-wide
deepspeed.init_distributed(dist_backend="gloo")
config = {"train_micro_batch_size_per_gpu": 1, "zero_allow_untested_optimizer": True,
          "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
          "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "torch_adam": True}}}
tok = AutoTokenizer.from_pretrained(path)
ref = AutoModelForCausalLM.from_pretrained(path)           # unsharded: loaded before the DeepSpeed config exists
keep_alive = HfDeepSpeedConfig(config)                     # from_pretrained now partitions at load (zero.Init)
ds, opt, _, _ = deepspeed.initialize(model=AutoModelForCausalLM.from_pretrained(path),
                                     model_parameters=None, config=config)
ds.module.train()
offload = opt.parameter_offload
sampling = SamplingConfig(n=2, temperature=1.0, max_new_tokens=8, seed=0)
flat = lambda out: [[c.token_ids, c.logprobs] for g in out for c in g]
report = {"partitioned": all(p.numel() == 0 for p in ds.module.parameters()), "hooks": len(offload.forward_hooks)}
for phase in ("initial", "after_steps"):
    report[phase] = {"reference": flat(ENGINES.get("hf")(ref, tok, {}).generate(prompts, sampling))}
    for gather in (True, False):
        engine = ENGINES.get("hf")(ds, tok, {"zero3_gather": gather})
        report[phase][str(gather)] = flat(engine.generate(prompts, sampling))
        report[phase]["hooks_" + str(gather)] = len(offload.forward_hooks)
        report[phase]["train_mode_" + str(gather)] = ds.module.training
    for _ in range(3):                                      # the policy moves: generation must follow, no copy
        ids = torch.tensor([prompts[0]])
        loss = ds(input_ids=ids, labels=ids).loss
        ds.backward(loss)
        ds.step()
    with deepspeed.zero.GatheredParameters(list(ds.module.parameters())):
        ref.load_state_dict({k: v.detach().clone() for k, v in ds.module.state_dict().items()})
report["partitioned_after"] = all(p.numel() == 0 for p in ds.module.parameters())
report["bare"] = flat(ENGINES.get("hf")(ref, tok, {}).generate(prompts, sampling))
ddp = torch.nn.parallel.DistributedDataParallel(ref)       # DDP-wrapped policy: unwrapped, the same weights
report["ddp"] = flat(ENGINES.get("hf")(ddp, tok, {}).generate(prompts, sampling))
print("REPORT" + json.dumps(report))
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_deepspeed_zero3_and_ddp_generation_match_the_bare_model(tiny):
    """One CPU process under ZeRO-3 (gloo): both gather modes sample exactly what the unsharded model samples,
    before and after optimizer steps (live weights), restore the hooks and the partitioning, and training goes on.
    A DDP-wrapped copy of the final weights samples the same as the bare model."""
    pytest.importorskip("deepspeed")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()),
           "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "DS_ACCELERATOR": "cpu"}
    proc = subprocess.run([sys.executable, "-c", ZERO3_PROBE, str(tiny["path"]), json.dumps(tiny["prompts"][:3])],
                          env=env, capture_output=True, text=True, timeout=600)
    lines = [x for x in proc.stdout.splitlines() if x.startswith("REPORT")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    report = json.loads(lines[-1][len("REPORT"):])
    assert report["partitioned"] and report["partitioned_after"] and report["hooks"] > 0
    for phase in ("initial", "after_steps"):
        want = report[phase]["reference"]
        for gather in ("True", "False"):
            got = report[phase][gather]
            assert [g[0] for g in got] == [w[0] for w in want], (phase, gather)
            for (_, lp), (_, ref_lp) in zip(got, want):
                torch.testing.assert_close(torch.tensor(lp), torch.tensor(ref_lp), atol=TOL, rtol=0)
            assert report[phase]["hooks_" + gather] == report["hooks"]       # ZeRO-3 hooks back in place
            assert report[phase]["train_mode_" + gather] is True
    assert report["initial"]["reference"] != report["after_steps"]["reference"]   # the weights did move
    assert report["ddp"] == report["bare"]
