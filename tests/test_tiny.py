"""The embedded tiny model: reloadable by plain transformers with identical token ids, deterministic per seed."""
import hashlib
import json

import torch
from tokenizers import Tokenizer
from transformers import AutoModelForCausalLM, AutoTokenizer

from posttrain.tiny import TinyModelConfig, build_tiny_model

from conftest import SHARED_GSM8K, TINY

TEXTS = [
    "What is 12 + 345?",
    "12+34=46\n#### 46<|im_end|>",
    "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n#### 72",
    "café ünïcode 😀  spaces   \n\n tabs\t and CAPS, it's we'll",
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
]


def test_autotokenizer_round_trip_keeps_ids(tiny_model_dir):
    raw = Tokenizer.from_file(str(tiny_model_dir / "tokenizer.json"))
    auto = AutoTokenizer.from_pretrained(tiny_model_dir)  # transformers picks Qwen2Tokenizer for a qwen2 directory
    texts = list(TEXTS)
    if (SHARED_GSM8K / "test.jsonl").is_file():
        rows = [json.loads(x) for x in (SHARED_GSM8K / "test.jsonl").read_text().splitlines()[:50]]
        texts += [r["question"] + "\n" + r["answer"] for r in rows]
    for text in texts:
        assert auto(text, add_special_tokens=False)["input_ids"] == raw.encode(text, add_special_tokens=False).ids, text
        assert auto.decode(raw.encode(text, add_special_tokens=False).ids) == text


def test_chat_template_and_special_tokens(tiny_tokenizer):
    tok = tiny_tokenizer
    text = tok.apply_chat_template([{"role": "user", "content": "What is 1 + 2?"}], add_generation_prompt=True,
                                   tokenize=False)
    assert text == "<|im_start|>user\nWhat is 1 + 2?<|im_end|>\n<|im_start|>assistant\n"
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert ids[0] == tok.convert_tokens_to_ids("<|im_start|>")
    # digits are single tokens, as in Qwen2
    assert tok.convert_ids_to_tokens(tok("12345", add_special_tokens=False)["input_ids"]) == list("12345")


def test_plain_transformers_loads_model(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert model.config.model_type == "qwen2" and model.config.hidden_size == TINY["hidden_size"]
    out = model(torch.tensor([[1, 2, 3]]))
    assert out.logits.shape == (1, 3, model.config.vocab_size)


def _digest(path) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(path.iterdir()) if p.is_file()}


def test_deterministic_for_a_seed(tmp_path):
    cfg = TinyModelConfig(**TINY, seed=3)
    a, b = build_tiny_model(tmp_path / "a", cfg), build_tiny_model(tmp_path / "b", cfg)
    assert _digest(a) == _digest(b)
    c = build_tiny_model(tmp_path / "c", TinyModelConfig(**TINY, seed=4))
    assert _digest(c)["model.safetensors"] != _digest(a)["model.safetensors"]
    assert _digest(c)["tokenizer.json"] == _digest(a)["tokenizer.json"]
