"""A value head on the policy's own backbone (PPO as in ReFT, arXiv 2401.08967, Sec. 3: a linear head on the last
hidden state, sharing the policy's weights), computed in the same forward pass as the logits.

    h_t = the final (normed) hidden state, exactly what the LM head reads      [B, T, H]
    V_t = w . h_t + b                                                           [B, T]

The hidden state is captured by a forward pre-hook on the LM head (`get_output_embeddings()`), registered for the
duration of one forward only, so there is one backbone pass and no `output_hidden_states` tuple of every layer. It
runs before any other pre-hook (policy.forward's fused path hands the head an empty slice of that same input).
Checkpoints: `state_dict()` holds `model.*` and `value_head.*` (what accelerate's save_state / load_state write and
read); `save_pretrained(dir)` writes the backbone as transformers does plus `value_head.safetensors`, and
`from_pretrained(dir)` reads both back.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from torch import Tensor, nn

VALUE_HEAD_FILE = "value_head.safetensors"


@dataclass
class ValueHeadOutput:
    logits: Tensor   # [B, T, V]
    values: Tensor   # [B, T] float32, V(s_t) of the state ending at position t


class ValueHeadModel(nn.Module):
    """A causal LM plus `value_head = nn.Linear(hidden, 1)`; forward returns logits and values."""

    def __init__(self, model: nn.Module, head: nn.Linear | None = None):
        super().__init__()
        self.model = model
        hidden = model.config.get_text_config().hidden_size
        self.value_head = head if head is not None else nn.Linear(hidden, 1)
        if head is None:  # small init: V starts near 0 (as OpenRLHF: std 1 / (H + 1))
            nn.init.normal_(self.value_head.weight, std=1.0 / (hidden + 1))
            nn.init.zeros_(self.value_head.bias)

    @property
    def config(self):
        return self.model.config

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None, **kwargs) -> ValueHeadOutput:
        seen: list[Tensor] = []                                             # the LM head's input, [B, T, H]
        hook = self.model.get_output_embeddings().register_forward_pre_hook(lambda _, args: seen.append(args[0]),
                                                                            prepend=True)   # before policy.forward's
        try:
            out = self.model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        finally:
            hook.remove()
        if len(seen) != 1:
            raise RuntimeError(f"value head: expected one LM-head call, saw {len(seen)}")
        hidden = seen[0]                                                    # h_t  [B, T, H]
        values = self.value_head(hidden.to(self.value_head.weight.dtype)).squeeze(-1)   # V_t = w . h_t + b  [B, T]
        return ValueHeadOutput(logits=out.logits, values=values.float())

    def generate(self, *args, **kwargs):
        """Generation is the backbone's (the value head is not used)."""
        return self.model.generate(*args, **kwargs)

    # --------------------------------------------------------------------------------------- checkpoints
    def save_pretrained(self, save_directory: str | Path, state_dict: dict | None = None, **kwargs) -> None:
        """The backbone with transformers' save_pretrained, the head in `value_head.safetensors` beside it.
        `state_dict` (e.g. accelerator.get_state_dict of this module) is split by prefix."""
        from safetensors.torch import save_file

        state = state_dict if state_dict is not None else self.state_dict()
        backbone = {k.removeprefix("model."): v for k, v in state.items() if k.startswith("model.")}
        head = {k.removeprefix("value_head."): v.detach().cpu().contiguous()
                for k, v in state.items() if k.startswith("value_head.")}
        self.model.save_pretrained(save_directory, state_dict=backbone, **kwargs)
        save_file(head, str(Path(save_directory) / VALUE_HEAD_FILE))

    @classmethod
    def from_pretrained(cls, path: str | Path, **kwargs) -> "ValueHeadModel":
        """Load the backbone (kwargs go to AutoModelForCausalLM.from_pretrained) and the head if it was saved
        (a plain policy checkpoint, e.g. after SFT warm-up, gets a freshly initialised head)."""
        from safetensors.torch import load_file
        from transformers import AutoModelForCausalLM

        wrapped = cls(AutoModelForCausalLM.from_pretrained(path, **kwargs))
        head_file = Path(path) / VALUE_HEAD_FILE
        if head_file.is_file():
            wrapped.value_head.load_state_dict(load_file(str(head_file)))
        return wrapped
