"""rsLoRA and rank_pattern / alpha_pattern end to end: per-module scaling, save -> load, PEFT both ways."""

from __future__ import annotations

import math

import pytest
import torch

from hf_lora import LoRAConfig, LoRAModelWrapper, wrap
from tests.conftest import make_llama

RANKS = {"q_proj": 4, "model.layers.1.self_attn.v_proj": 2}
ALPHAS = {"v_proj": 8, "o_proj|k_proj": 3}


def _config(**kw):
    base = dict(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                use_rslora=True, rank_pattern=RANKS, alpha_pattern=ALPHAS, init_lora_weights=False)
    base.update(kw)
    return LoRAConfig(**base)


def _expected(path: str, rslora: bool) -> tuple[int, float]:
    leaf = path.rsplit(".", 1)[-1]
    r = 4 if leaf == "q_proj" else 2 if path == "model.layers.1.self_attn.v_proj" else 8
    alpha = 8 if leaf == "v_proj" else 3 if leaf in ("o_proj", "k_proj") else 16
    return r, alpha / (math.sqrt(r) if rslora else r)


@pytest.mark.parametrize("rslora", [True, False])
def test_rank_and_scaling_per_module(rslora, input_ids):
    model = wrap(make_llama(), _config(use_rslora=rslora))
    seen = 0
    for path, module in model.base_model.named_modules():
        if hasattr(module, "lora_A"):
            r, scaling = _expected(path, rslora)
            assert module.r == r and module.lora_A.weight.shape[0] == r, path
            assert module.scaling == pytest.approx(scaling), path
            seen += 1
    assert seen == 8
    # the scaling is actually applied: forward - base == scaling * B A x on one layer
    layer = model.base_model.model.layers[1].self_attn.v_proj
    x = torch.randn(3, 64)
    delta = layer(x) - layer.base_layer(x)
    torch.testing.assert_close(delta, _expected("model.layers.1.self_attn.v_proj", rslora)[1] * x @ layer.lora_A.weight.T @ layer.lora_B.weight.T)


def test_rslora_scaling_is_rank_stable():
    # alpha / sqrt(r): going from r=4 to r=64 scales by 1/4, not 1/16.
    small = LoRAConfig(r=4, lora_alpha=16, use_rslora=True).scaling_for("q_proj")
    big = LoRAConfig(r=64, lora_alpha=16, use_rslora=True).scaling_for("q_proj")
    assert small / big == pytest.approx(4.0)


def test_save_load_exact(tmp_path, input_ids):
    model = wrap(make_llama(), _config())
    expected = model(input_ids=input_ids).logits
    model.save_pretrained(str(tmp_path))
    loaded = LoRAModelWrapper.from_pretrained(make_llama(), str(tmp_path))
    assert loaded.lora_config.use_rslora is True
    assert loaded.base_model.model.layers[1].self_attn.v_proj.r == 2
    torch.testing.assert_close(loaded(input_ids=input_ids).logits, expected, rtol=0, atol=0)


def test_peft_loads_ours(tmp_path, input_ids):
    from peft import PeftModel

    model = wrap(make_llama(), _config())
    expected = model(input_ids=input_ids).logits
    model.save_pretrained(str(tmp_path))
    peft_model = PeftModel.from_pretrained(make_llama(), str(tmp_path))
    v1 = peft_model.base_model.model.model.layers[1].self_attn.v_proj
    assert v1.r["default"] == 2 and v1.scaling["default"] == pytest.approx(8 / math.sqrt(2))
    torch.testing.assert_close(peft_model(input_ids=input_ids).logits, expected, rtol=1e-5, atol=1e-5)


def test_we_load_peft(tmp_path, input_ids):
    from peft import LoraConfig, get_peft_model

    peft_cfg = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                          use_rslora=True, rank_pattern=dict(RANKS), alpha_pattern=dict(ALPHAS), init_lora_weights=False)
    peft_model = get_peft_model(make_llama(), peft_cfg).eval()
    expected = peft_model(input_ids=input_ids).logits
    peft_model.save_pretrained(str(tmp_path))
    ours = LoRAModelWrapper.from_pretrained(make_llama(), str(tmp_path))
    for path, module in ours.base_model.named_modules():
        if hasattr(module, "lora_A"):
            assert (module.r, module.scaling) == pytest.approx(_expected(path, True)), path
    torch.testing.assert_close(ours(input_ids=input_ids).logits, expected, rtol=1e-5, atol=1e-5)


def test_merge_equals_unmerged_with_patterns(input_ids):
    model = wrap(make_llama(), _config())
    before = model(input_ids=input_ids).logits
    model.merge()
    torch.testing.assert_close(model(input_ids=input_ids).logits, before, rtol=1e-5, atol=1e-5)
