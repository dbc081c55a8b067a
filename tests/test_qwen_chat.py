"""Qwen3's real tokenizer and chat template: demonstration ids and loss masks, rollout prompts, prompt templates for
base checkpoints, and where generation stops (tests/conftest.py builds the random-weight Qwen fixtures)."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from posttrain.configlib import ConfigError, build
from posttrain.data import DataConfig, collate_demos, to_examples, tokenize_demos
from posttrain.rollout import ENGINES, SamplingConfig, encode_prompts

SYSTEM = {"role": "system", "content": "Answer briefly."}
USER1, USER2 = {"role": "user", "content": "Say hi."}, {"role": "user", "content": "What is 2 + 2?"}
HI, FOUR = {"role": "assistant", "content": "Hi!"}, {"role": "assistant", "content": "2 + 2 = 4.\n#### 4"}
THOUGHT = {"role": "assistant", "content": "#### 4", "reasoning_content": "Two and two make four."}


def demo(tok, conversation: list[dict], **data):
    """(input ids, the text of the loss tokens) of one `messages` row, as the trainer tokenizes it."""
    cfg = build(DataConfig, {"source": "inline", "columns": {"messages": "messages"}, **data})
    items, _ = tokenize_demos(to_examples([{"messages": conversation}], dict(cfg.columns), cfg), tok, cfg)
    exp = collate_demos(items, tok.pad_token_id)
    ids = exp.input_ids[0][exp.attention_mask[0].bool()].tolist()
    masked = exp.input_ids[0][exp.loss_mask[0].bool()].tolist()
    return ids, masked


def template_ids(tok, conversation, **kwargs) -> list[int]:
    return list(tok.apply_chat_template(conversation, tokenize=True, **kwargs)["input_ids"])


@pytest.mark.parametrize("kwargs", [{}, {"enable_thinking": False}])
def test_single_turn_trains_the_answer_and_im_end_only(qwen_tokenizer, kwargs):
    """Ids are apply_chat_template's exactly; the loss covers the answer and <|im_end|>: not the system or user turn,
    not the header, not Qwen3's empty <think> block, not the newline after <|im_end|>."""
    tok, conv = qwen_tokenizer, [SYSTEM, USER2, FOUR]
    ids, masked = demo(tok, conv, chat_template_kwargs=kwargs)
    assert ids == template_ids(tok, conv, **kwargs)
    assert tok.decode(ids).endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n2 + 2 = 4.\n#### 4<|im_end|>\n")
    assert tok.decode(masked) == "2 + 2 = 4.\n#### 4<|im_end|>"


def test_reasoning_is_trained_when_the_data_has_it(qwen_tokenizer):
    tok = qwen_tokenizer
    for reply in (THOUGHT, {"role": "assistant", "content": "<think>\nTwo and two make four.\n</think>\n\n#### 4"}):
        conv = [USER2, reply]
        ids, masked = demo(tok, conv)
        assert ids == template_ids(tok, conv)
        assert tok.decode(masked) == "<think>\nTwo and two make four.\n</think>\n\n#### 4<|im_end|>"


def test_multi_turn_last_or_every_assistant_turn(qwen_tokenizer):
    """Qwen3 renders earlier assistant turns without reasoning and the last one with a (here empty) think block; the
    demonstration is the template's rendering of the whole conversation either way."""
    tok, conv = qwen_tokenizer, [SYSTEM, USER1, THOUGHT | {"content": "Hi!"}, USER2, FOUR]
    ids, last = demo(tok, conv)
    ids_all, every = demo(tok, conv, assistant_turns="all")
    assert ids == ids_all == template_ids(tok, conv)
    assert "Two and two" not in tok.decode(ids)                        # history reasoning dropped by the template
    assert tok.decode(last) == "2 + 2 = 4.\n#### 4<|im_end|>"
    assert tok.decode(every) == "Hi!<|im_end|>2 + 2 = 4.\n#### 4<|im_end|>"


def test_rollout_prompts_are_the_generation_prompt(qwen_tokenizer):
    """encode_prompts equals apply_chat_template(add_generation_prompt=True) with the recipe's template kwargs, and the
    demonstration's prompt ids are those of the same conversation's rollout prompt."""
    tok, prompt = qwen_tokenizer, [SYSTEM, USER2]
    for kwargs in ({}, {"enable_thinking": False}, {"enable_thinking": True}):
        cfg = build(DataConfig, {"source": "inline", "chat_template_kwargs": kwargs})
        expected = template_ids(tok, prompt, add_generation_prompt=True, **kwargs)
        assert encode_prompts(tok, [prompt], cfg) == [expected]
    assert tok.decode(encode_prompts(tok, [prompt], cfg)[0]).endswith("<|im_start|>assistant\n")
    quiet = build(DataConfig, {"source": "inline", "chat_template_kwargs": {"enable_thinking": False}})
    assert tok.decode(encode_prompts(tok, [prompt], quiet)[0]).endswith("assistant\n<think>\n\n</think>\n\n")
    items, _ = tokenize_demos(to_examples([{"prompt": prompt, "completion": "#### 4"}], {}, cfg), tok, cfg)
    assert items[0].input_ids[: items[0].prompt_len] == encode_prompts(tok, [prompt], cfg)[0]


R1_ZERO = ("A conversation between User and Assistant. The user asks a question, and the Assistant solves it. The "
           "assistant first thinks about the reasoning process in the mind and then provides the user with the answer. "
           "User: {prompt} Assistant: <think>")


def test_prompt_template_for_base_checkpoints(qwen_tokenizer, tiny_tokenizer):
    tok = qwen_tokenizer
    cfg = build(DataConfig, {"source": "inline", "prompt_template": R1_ZERO})
    text = R1_ZERO.replace("{prompt}", "What is 2 + 2?")
    assert encode_prompts(tok, [[USER2]], cfg) == [tok(text)["input_ids"]]
    items, _ = tokenize_demos(to_examples([{"prompt": "What is 2 + 2?", "completion": " 2 + 2 = 4 </think> 4"}], {},
                                          cfg), tok, cfg)
    ids, mask = items[0].input_ids, items[0].loss_mask
    assert ids == tok(text + " 2 + 2 = 4 </think> 4" + tok.eos_token)["input_ids"]
    assert tok.decode([t for t, m in zip(ids, mask) if m]) == " 2 + 2 = 4 </think> 4<|im_end|>"
    with pytest.raises(ConfigError, match=r"data\.prompt_template: must contain \{prompt\} exactly once"):
        build(DataConfig, {"source": "inline", "prompt_template": "Question:"}, "data")
    with pytest.raises(ConfigError, match=r"data\.system_prompt: a chat message"):
        build(DataConfig, {"source": "inline", "prompt_template": R1_ZERO, "system_prompt": "x"}, "data")


def test_a_tokenizer_without_chat_template_needs_a_prompt_template(tiny_model_dir, tmp_path):
    """Refused only when neither exists, naming the data section and how to set one."""
    from posttrain.models import ModelConfig, load_tokenizer

    bare = tmp_path / "base"
    shutil.copytree(tiny_model_dir, bare)
    (bare / "chat_template.jinja").unlink(missing_ok=True)
    config = json.loads((bare / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (bare / "tokenizer_config.json").write_text(json.dumps(config))
    chat = build(DataConfig, {"source": "inline"})
    plain = build(DataConfig, {"source": "inline", "prompt_template": "Q: {prompt}\nA:"})
    with pytest.raises(ConfigError,
                       match=r"stages\.0\.data\.prompt_template: the tokenizer of .* has no chat template"):
        load_tokenizer(str(bare), ModelConfig(path=str(bare)), {"stages.0.data": chat})
    tok = load_tokenizer(str(bare), ModelConfig(path=str(bare)), {"stages.0.data": plain, "stages.0.eval.data": None})
    assert tok.chat_template is None
    assert encode_prompts(tok, [[USER2]], plain)[0] == tok("Q: What is 2 + 2?\nA:")["input_ids"]


def _forcing(model, tokens: list[int]):
    """A forward hook on the LM head: decoding step i emits tokens[i] (its logit raised by 1e4), whatever the
    weights."""
    calls = []

    def hook(_module, _args, logits):
        step = min(len(calls), len(tokens) - 1)
        calls.append(step)
        bias = torch.zeros(logits.shape[-1], dtype=logits.dtype)
        bias[tokens[step]] = 1e4
        return logits + bias

    return model.get_output_embeddings().register_forward_hook(hook)


@pytest.mark.parametrize("end", ["<|im_end|>", "<|endoftext|>"])
def test_generation_stops_at_either_eos_and_rewards_see_no_special_tokens(qwen3_model_dir, qwen_tokenizer, end):
    from transformers import AutoModelForCausalLM

    tok = qwen_tokenizer
    model = AutoModelForCausalLM.from_pretrained(qwen3_model_dir, dtype=torch.float32)
    engine = ENGINES.get("hf")(model, tok, {})
    assert engine.eos_ids == sorted(tok.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"]))
    words = tok("Hello world", add_special_tokens=False)["input_ids"]
    forced = [tok.convert_tokens_to_ids("<think>"), *words, tok.convert_tokens_to_ids("</think>"), *words,
              tok.convert_tokens_to_ids(end), *words]
    handle = _forcing(model, forced)
    try:
        prompt = encode_prompts(tok, [[USER2]])
        (completion,) = engine.generate(prompt, SamplingConfig(n=1, temperature=1.0, max_new_tokens=20, seed=0))[0]
    finally:
        handle.remove()
    assert completion.finish_reason == "stop"
    assert completion.token_ids == forced[: forced.index(forced[-len(words) - 1]) + 1]
    assert completion.text == "<think>Hello world</think>Hello world"       # <think> is text; <|..|> are special
