"""train.share_prompts (posttrain/ops/packing.py plan_shared_prompts): rows that begin with the same prompt run it
once. The layout and its attention mask by hand; the forward equal to the padded one in log-probs, entropy, logits,
values and gradients under sdpa and eager attention; a trainer step of GRPO (with a KL and two updates: the scoring
passes too), LUFFY and PPO equal to the padded step; the layouts nobody can run refused before the model loads."""
import pytest
import torch
from test_hybrids import assert_same_grads, first_step, raw_recipe
from transformers import AutoModelForCausalLM

from posttrain.config import parse_recipe
from posttrain.configlib import ConfigError
from posttrain.experience import POLICY, PROMPT, Experience
from posttrain.ops.packing import pack, plan_shared_prompts, unpack
from posttrain.policy import forward
from posttrain.rl.value_head import ValueHeadModel

pytestmark = pytest.mark.usefixtures("one_thread")


def test_shared_prompt_layout_by_hand():
    ids = torch.tensor([[5, 6, 7, 8], [5, 6, 9, 0], [5, 7, 1, 0]])    # rows 0 and 1 share the prompt [5, 6]
    attn = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0], [1, 1, 1, 0]])
    prompt = torch.tensor([[1, 1, 0, 0], [1, 1, 0, 0], [1, 1, 0, 0]])
    p = plan_shared_prompts(attn, prompt, ids)
    # unit [5, 6 | 7, 8 | 9] (5 tokens) fills row 0; unit [5, 7 | 1] opens row 1, then filler
    assert (p.rows, p.width) == (2, 5)
    assert pack(ids, p).tolist() == [[5, 6, 7, 8, 9], [5, 7, 1, 0, 0]]
    assert p.position_ids.tolist() == [[0, 1, 2, 3, 2], [0, 1, 2, 0, 1]]   # row 1's continuation starts after [5, 6]
    a = p.attention[:, 0].int().tolist()                                # [R, P, P]
    assert a[0][3] == [1, 1, 1, 1, 0]            # the 8 sees the prompt and its own 7
    assert a[0][4] == [1, 1, 0, 0, 1]            # the 9 sees the prompt and itself, not row 0's continuation
    assert a[1][2] == [1, 1, 1, 0, 0] and a[1][4] == [0, 0, 0, 1, 1]   # filler: only filler (no empty rows: no NaN)
    assert torch.equal(unpack(pack(ids, p), p), ids * attn)
    y = torch.ones(p.rows, p.width, requires_grad=True)
    unpack(y, p).sum().backward()                # the shared prompt gets the gradient of both rows that read it
    assert y.grad.tolist() == [[2, 2, 1, 1, 1], [1, 1, 1, 0, 0]]


def test_rows_without_a_prompt_or_left_padded_stay_whole():
    ids = torch.tensor([[0, 5, 6, 7], [3, 4, 0, 0], [0, 5, 6, 8]])      # rows 0 and 2 left-padded, row 1 no prompt
    attn = torch.tensor([[0, 1, 1, 1], [1, 1, 0, 0], [0, 1, 1, 1]])
    prompt = torch.tensor([[1, 1, 1, 0], [0, 0, 0, 0], [1, 1, 1, 0]])  # padding is marked PROMPT, as rollouts do
    p = plan_shared_prompts(attn, prompt, ids)
    assert pack(ids, p).tolist() == [[5, 6, 7, 8], [3, 4, 0, 0]]
    assert p.position_ids.tolist() == [[0, 1, 2, 2], [0, 1, 0, 1]]
    assert torch.equal(unpack(pack(ids, p), p), ids * attn)


def _groups(vocab: int) -> Experience:
    """Three prompts of different lengths with 3, 2 and 1 continuations of different lengths, right padded."""
    torch.manual_seed(0)
    spec = [(7, [5, 9, 2]), (4, [11, 3]), (10, [6])]
    rows = []
    for prompt_len, lengths in spec:
        prompt = torch.randint(3, vocab, (prompt_len,))
        rows += [(prompt, torch.randint(3, vocab, (n,))) for n in lengths]
    width = max(len(p) + len(c) for p, c in rows)
    ids, attn, source = (torch.zeros(len(rows), width, dtype=torch.long) for _ in range(3))
    source[:] = PROMPT
    for r, (p, c) in enumerate(rows):
        ids[r, :len(p) + len(c)] = torch.cat([p, c])
        attn[r, :len(p) + len(c)] = 1
        source[r, len(p):len(p) + len(c)] = POLICY
    return Experience(input_ids=ids, attention_mask=attn, loss_mask=(source == POLICY).long(), source=source)


@pytest.mark.parametrize("fixture", ["tiny_model_dir", "qwen3_model_dir"])
@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_shared_prompt_forward_equals_padded(fixture, attention, request):
    model = AutoModelForCausalLM.from_pretrained(request.getfixturevalue(fixture), dtype=torch.float32,
                                                 attn_implementation=attention)
    exp = _groups(min(model.config.vocab_size, 500))
    mask = exp.target_mask.bool()
    outs, grads = {}, {}
    for layout in ("padded", "shared_prompts"):
        model.zero_grad()
        out = forward(model, exp, temperature=0.7, entropy=True, layout=layout)
        loss = -(out.logprobs * exp.target_mask).sum() / exp.target_mask.sum()
        loss.backward()
        outs[layout] = (out.logprobs[mask].detach(), out.entropy[mask].detach(), float(loss.detach()))
        grads[layout] = {k: p.grad.clone() for k, p in model.named_parameters()}
    (lp, ent, loss), (lp2, ent2, loss2) = outs["padded"], outs["shared_prompts"]
    assert torch.allclose(lp2, lp, atol=1e-5) and torch.allclose(ent2, ent, atol=1e-5)
    assert loss2 == pytest.approx(loss, abs=1e-6)
    for k in grads["padded"]:
        assert torch.allclose(grads["shared_prompts"][k], grads["padded"][k], atol=1e-6, rtol=1e-4), k
    with torch.no_grad():                                               # the full-logits path, too
        padded = forward(model, exp, logits=True).logits[mask]
        shared = forward(model, exp, logits=True, layout="shared_prompts").logits[mask]
    assert torch.allclose(shared, padded, atol=1e-5)


def test_shared_prompt_values_equal_padded(tiny_model_dir):
    torch.manual_seed(1)
    model = ValueHeadModel(AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32))
    exp = _groups(min(model.config.vocab_size, 500))
    real = exp.attention_mask[:, :-1].bool()
    with torch.no_grad():
        padded = forward(model, exp).values[real]
        shared = forward(model, exp, layout="shared_prompts").values[real]
    assert torch.allclose(shared, padded, atol=1e-5)


STEPS = {"grpo": ({"grpo": {"beta": 0.05}}, {"objectives": {"grpo": 1.0}}, {"num_iterations": 2}),
         "luffy": ({"luffy": {}, "sft": {}}, {"objectives": {"sft": 0.3, "luffy": 1.0}}, {}),
         "ppo": ({"ppo": {"type": "ppo", "beta": 0.05}}, {"objectives": {"ppo": 1.0}}, {})}


@pytest.mark.parametrize("name", list(STEPS))
def test_trainer_step_with_shared_prompts_equals_padded(name, tiny_model_dir, tmp_path, toy_reward):
    """GRPO with a KL and two updates per batch (so the reference and the old policy are scored in the shared
    layout), LUFFY + SFT (the demonstration shares its group's prompt) and PPO (values): the first step's loss and
    every gradient equal the padded step's."""
    objectives, stage, rollout = STEPS[name]
    results = []
    for shared in (False, True):
        raw = raw_recipe(tiny_model_dir, tmp_path / f"{name}-{shared}", toy_reward(), objectives, stage, rollout)
        raw["train"]["micro_batch_size"] = 8                             # two groups of 4 per micro-batch
        raw["train"]["share_prompts"] = shared
        results.append(first_step(raw))
    (ma, ga), (mb, gb) = results
    assert ma["loss"] == pytest.approx(mb["loss"], abs=1e-6)
    assert ma["reward/mean"] == mb["reward/mean"]                        # the same samples: generation is untouched
    assert_same_grads(ga, gb, atol=2e-6)


def test_layouts_nobody_can_run_are_refused(tiny_model_dir, tmp_path, toy_reward):
    raw = raw_recipe(tiny_model_dir, tmp_path / "x", toy_reward(), {"grpo": {}}, {"objectives": {"grpo": 1.0}})
    raw["train"] |= {"share_prompts": True, "padding_free": True}
    with pytest.raises(ConfigError, match="train.share_prompts: padding_free and share_prompts"):
        parse_recipe(raw, "r.yaml")
    raw["train"]["padding_free"] = False
    raw["model"]["attn_implementation"] = "flash_attention_2"
    with pytest.raises(ConfigError, match=r"r.yaml: stages.0.train.share_prompts: needs .* 'flash_attention_2'"):
        parse_recipe(raw, "r.yaml")


def test_layouts_equal_padded_under_lora(qwen3_model_dir):
    """A PEFT LoRA policy and its adapter-disabled reference: the packed and shared-prompt layouts give the padded
    log-probs and the same adapter gradients."""
    from posttrain.models import AdapterDisabledReference, LoraSettings, ModelConfig, load_model

    policy = load_model(str(qwen3_model_dir), ModelConfig(path=str(qwen3_model_dir),
                                                          lora=LoraSettings(r=4, alpha=8, dropout=0.0)))
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.5)                                       # as after training: B != 0
    exp = _groups(500)
    mask = exp.target_mask.bool()
    results = {}
    for layout in ("padded", "padding_free", "shared_prompts"):
        policy.zero_grad()
        out = forward(policy, exp, layout=layout)
        (-(out.logprobs * exp.target_mask).sum() / exp.target_mask.sum()).backward()
        with torch.no_grad():
            ref = forward(AdapterDisabledReference(policy), exp, layout=layout).logprobs[mask]
        results[layout] = (out.logprobs[mask].detach(), ref,
                           {n: p.grad.clone() for n, p in policy.named_parameters() if p.grad is not None})
    lp, ref, grads = results["padded"]
    assert grads and all("lora_" in n for n in grads)                    # only the adapters train
    for layout in ("padding_free", "shared_prompts"):
        lp2, ref2, grads2 = results[layout]
        assert torch.allclose(lp2, lp, atol=1e-5) and torch.allclose(ref2, ref, atol=1e-5), layout
        for n in grads:                                                  # float32 rounding of a different layout
            assert (grads2[n] - grads[n]).abs().max() <= 1e-5 * grads[n].abs().max(), (layout, n)
