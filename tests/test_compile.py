"""train.compile (policy.compiled_backbone): the torch.compile'd backbone gives the eager forward's log-probs and
gradients within 1e-5, in the padded and the shared-prompt layouts; generation outside the training forward stays
eager; a trainer step with it equals the eager step."""
import pytest
import torch
from safetensors.torch import load_file
from test_shared_prompts import _groups
from transformers import AutoModelForCausalLM

from posttrain.policy import compiled_backbone, forward
from posttrain.trainer import train

from conftest import read_metrics, sft_recipe

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("layout", ["padded", "shared_prompts"])
def test_compiled_forward_equals_eager(layout, tiny_model_dir):
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    exp = _groups(model.config.vocab_size)
    mask = exp.target_mask.bool()
    results = {}
    for compiled in (False, True):
        model.zero_grad()
        out = forward(model, exp, temperature=0.7, entropy=True, layout=layout, compiled=compiled)
        (-(out.logprobs * exp.target_mask).sum() / exp.target_mask.sum()).backward()
        results[compiled] = (out.logprobs[mask].detach(), out.entropy[mask].detach(),
                             {k: p.grad.clone() for k, p in model.named_parameters()})
    (lp, ent, grads), (lp_c, ent_c, grads_c) = results[False], results[True]
    assert torch.allclose(lp_c, lp, atol=1e-5) and torch.allclose(ent_c, ent, atol=1e-5)
    for k in grads:
        assert torch.allclose(grads_c[k], grads[k], atol=1e-5, rtol=1e-4), k
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1   # it did compile (no silent eager fallback)
    assert "forward" not in vars(model.model)                            # generation sees the eager forward again


def test_compiled_backbone_is_restored_after_an_error(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    with pytest.raises(RuntimeError, match="boom"):
        with compiled_backbone(model, True):
            assert "forward" in vars(model.model)
            raise RuntimeError("boom")
    assert "forward" not in vars(model.model)


def test_trainer_step_compiled_equals_eager(tiny_model_dir, tmp_path):
    torch._dynamo.reset()
    rows, weights = {}, {}
    for name, extra in {"eager": [], "compiled": ["train.compile=true"]}.items():
        train(sft_recipe(tiny_model_dir, tmp_path / name, steps=2, overrides=["schedule.warmup_steps=0", *extra]))
        rows[name] = [r for r in read_metrics(tmp_path / name) if "loss" in r]
        weights[name] = load_file(str(tmp_path / name / "final/model.safetensors"))
    for a, b in zip(rows["eager"], rows["compiled"], strict=True):
        assert b["loss"] == pytest.approx(a["loss"], abs=1e-5)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)
    assert max((weights["compiled"][k] - weights["eager"][k]).abs().max().item() for k in weights["eager"]) < 1e-4
