"""DoRA: identity at init, merge == unmerged, exact save/load, PEFT parity (files, logits, gradients)."""

from __future__ import annotations

import pytest
import torch

from hf_lora import LoRAConfig, LoRAModelWrapper, wrap
from hf_lora.dora import DoRAConv1D, DoRALinear, DoRALinear4bit, DoRALinear8bit
from hf_lora.optimizers import loraplus_param_groups
from hf_lora.quantized import keep_cpu_4bit_weights_fixed
from tests.conftest import load_quantized, make_gpt2, make_llama, save_base

LLAMA = ["q_proj", "v_proj", "down_proj"]
GPT2 = ["c_attn", "c_fc"]


def _cfg(targets, **kw):
    base = dict(r=4, lora_alpha=16, lora_dropout=0.0, target_modules=targets, use_dora=True)
    base.update(kw)
    return LoRAConfig(**base)


def _peft_cfg(targets, **kw):
    from peft import LoraConfig

    return LoraConfig(r=4, lora_alpha=16, lora_dropout=0.0, target_modules=targets, use_dora=True, **kw)


def _perturb(params, seed=0, size=0.1):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.add_(size * torch.randn(p.shape, generator=gen).to(p.device))


def _dora_layers(model):
    return [(p, m) for p, m in model.base_model.named_modules() if hasattr(m, "lora_magnitude_vector")]


@pytest.mark.parametrize(("make", "targets", "cls"), [(make_llama, LLAMA, DoRALinear), (make_gpt2, GPT2, DoRAConv1D)])
def test_fresh_identity_keys_and_magnitude(make, targets, cls, input_ids):
    expected = make()(input_ids=input_ids).logits
    model = wrap(make(), _cfg(targets))
    torch.testing.assert_close(model(input_ids=input_ids).logits, expected, rtol=0, atol=1e-6)
    layers = _dora_layers(model)
    assert layers and all(type(m) is cls for _, m in layers)
    path, layer = layers[0]
    dense = layer.base_layer.weight.detach().float()
    dense = dense.T if cls is DoRAConv1D else dense
    torch.testing.assert_close(layer.lora_magnitude_vector.detach(), dense.norm(dim=1))
    keys = set(model.state_dict())
    assert f"base_model.{path}.lora_magnitude_vector" in keys
    assert len(keys) == 3 * len(layers)  # A, B, magnitude per layer, nothing else


@pytest.mark.parametrize(("make", "targets"), [(make_llama, LLAMA), (make_gpt2, GPT2)])
@pytest.mark.parametrize("keep_original", [True, False])
def test_merge_equals_unmerged_and_unmerge_restores(make, targets, keep_original, input_ids):
    model = wrap(make(), _cfg(targets))
    _perturb(model.adapter_parameters().values())
    before = {n: p.detach().clone() for n, p in model.base_model.named_parameters() if "base_layer" in n}
    unmerged = model(input_ids=input_ids).logits
    model.merge(keep_original=keep_original)
    model.merge(keep_original=keep_original)  # idempotent
    torch.testing.assert_close(model(input_ids=input_ids).logits, unmerged, rtol=1e-5, atol=1e-5)
    model.unmerge()
    atol = 0 if keep_original else 1e-5
    for n, p in model.base_model.named_parameters():
        if n in before:
            torch.testing.assert_close(p.detach(), before[n], rtol=0, atol=atol)
    torch.testing.assert_close(model(input_ids=input_ids).logits, unmerged, rtol=1e-5, atol=1e-5)


def test_merged_weight_has_the_trained_row_norms():
    model = wrap(make_llama(), _cfg(["q_proj"]))
    _perturb(model.adapter_parameters().values())
    layer = _dora_layers(model)[0][1]
    layer.merge()
    torch.testing.assert_close(layer.base_layer.weight.norm(dim=1), layer.lora_magnitude_vector.detach().abs(), rtol=1e-5, atol=1e-6)


def test_save_load_exact_and_disable(tmp_path, input_ids):
    base_logits = make_llama()(input_ids=input_ids).logits
    model = wrap(make_llama(), _cfg(LLAMA))
    _perturb(model.adapter_parameters().values())
    expected = model(input_ids=input_ids).logits
    with model.disable_adapter():
        torch.testing.assert_close(model(input_ids=input_ids).logits, base_logits, rtol=0, atol=0)
    model.save_pretrained(str(tmp_path))
    loaded = LoRAModelWrapper.from_pretrained(make_llama(), str(tmp_path))
    assert loaded.lora_config.use_dora is True
    torch.testing.assert_close(loaded(input_ids=input_ids).logits, expected, rtol=0, atol=0)


@pytest.mark.parametrize(("make", "targets"), [(make_llama, LLAMA), (make_gpt2, GPT2)])
def test_peft_loads_ours_and_we_load_peft(make, targets, tmp_path, input_ids):
    from peft import PeftModel, get_peft_model

    model = wrap(make(), _cfg(targets))
    _perturb(model.adapter_parameters().values())
    expected = model(input_ids=input_ids).logits
    model.save_pretrained(str(tmp_path / "ours"))
    peft_model = PeftModel.from_pretrained(make(), str(tmp_path / "ours"))
    torch.testing.assert_close(peft_model(input_ids=input_ids).logits, expected, rtol=1e-5, atol=1e-5)

    theirs = get_peft_model(make(), _peft_cfg(targets, fan_in_fan_out=make is make_gpt2)).eval()
    _perturb([p for p in theirs.parameters() if p.requires_grad], seed=1)
    their_logits = theirs(input_ids=input_ids).logits
    theirs.save_pretrained(str(tmp_path / "theirs"))
    ours = LoRAModelWrapper.from_pretrained(make(), str(tmp_path / "theirs"))
    torch.testing.assert_close(ours(input_ids=input_ids).logits, their_logits, rtol=1e-5, atol=1e-5)


def test_gradients_match_peft_norm_detached(input_ids):
    from peft import get_peft_model, set_peft_model_state_dict

    from hf_lora.checkpoint import adapter_tensors

    ours = wrap(make_llama(), _cfg(["q_proj", "down_proj"]))
    _perturb(ours.adapter_parameters().values())
    theirs = get_peft_model(make_llama(), _peft_cfg(["q_proj", "down_proj"])).eval()
    assert not set_peft_model_state_dict(theirs, adapter_tensors(ours)).unexpected_keys
    ours(input_ids=input_ids, labels=input_ids).loss.backward()
    theirs(input_ids=input_ids, labels=input_ids).loss.backward()
    path, layer = _dora_layers(ours)[1]
    peft_layer = theirs.base_model.model.get_submodule(path)
    torch.testing.assert_close(layer.lora_magnitude_vector.grad, peft_layer.lora_magnitude_vector["default"].weight.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(layer.lora_A.weight.grad, peft_layer.lora_A["default"].weight.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(layer.lora_B.weight.grad, peft_layer.lora_B["default"].weight.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize(("bits", "cls"), [(4, DoRALinear4bit), (8, DoRALinear8bit)])
def test_quantized_bases(bits, cls, tmp_path, input_ids):
    from peft import PeftModel

    path = save_base(make_llama(), tmp_path / "base")
    base = load_quantized(path, bits)
    expected = base(input_ids=input_ids).logits
    model = wrap(base, _cfg(["q_proj", "v_proj"]))
    assert all(type(m) is cls for _, m in _dora_layers(model))
    torch.testing.assert_close(model(input_ids=input_ids).logits, expected, rtol=0, atol=1e-5)
    _perturb(model.adapter_parameters().values())
    trained = model(input_ids=input_ids).logits
    model.save_pretrained(str(tmp_path / "adapter"))
    peft_base = load_quantized(path, bits)
    keep_cpu_4bit_weights_fixed(peft_base)  # as wrap does: bnb's CPU repacking alone moves logits by ~2e-3
    peft_model = PeftModel.from_pretrained(peft_base, str(tmp_path / "adapter"))
    torch.testing.assert_close(peft_model(input_ids=input_ids).logits, trained, rtol=1e-4, atol=1e-4)
    layer = _dora_layers(model)[0][1]
    snapshot = layer.base_layer.weight.detach().clone()
    with pytest.warns(UserWarning, match="requantizes"):
        model.merge()
    assert (model(input_ids=input_ids).logits - trained).abs().max() < 0.05  # requantized: close, not equal
    model.unmerge()
    assert torch.equal(layer.base_layer.weight.detach(), snapshot)
    torch.testing.assert_close(model(input_ids=input_ids).logits, trained, rtol=0, atol=0)


def test_magnitude_trains_without_weight_decay_in_loraplus():
    model = wrap(make_llama(), _cfg(["q_proj"]))
    groups = {g["name"]: g for g in loraplus_param_groups(model, lr=1e-4, weight_decay=0.1)}
    mags = {id(m.lora_magnitude_vector) for _, m in _dora_layers(model)}
    assert {id(p) for p in groups["no_decay"]["params"]} == mags and groups["no_decay"]["weight_decay"] == 0.0


def test_embedding_dora_identity_merge_and_peft_parity(tmp_path, input_ids):
    from peft import PeftModel, get_peft_model

    from hf_lora.dora import DoRAEmbedding

    expected = make_llama()(input_ids=input_ids).logits
    model = wrap(make_llama(), _cfg(["embed_tokens", "q_proj"]))
    emb = model.base_model.model.embed_tokens
    assert type(emb) is DoRAEmbedding and emb.lora_magnitude_vector.shape == (64,)  # one per embedding dimension
    torch.testing.assert_close(emb.lora_magnitude_vector.detach(), emb.base_layer.weight.norm(dim=0))
    torch.testing.assert_close(model(input_ids=input_ids).logits, expected, rtol=0, atol=1e-6)
    _perturb(model.adapter_parameters().values())
    trained = model(input_ids=input_ids).logits
    model.merge(keep_original=False)
    torch.testing.assert_close(model(input_ids=input_ids).logits, trained, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(emb.base_layer.weight.norm(dim=0), emb.lora_magnitude_vector.detach().abs(), rtol=1e-5, atol=1e-6)
    model.unmerge()
    torch.testing.assert_close(model(input_ids=input_ids).logits, trained, rtol=1e-5, atol=1e-5)
    model.save_pretrained(str(tmp_path / "ours"))
    peft_model = PeftModel.from_pretrained(make_llama(), str(tmp_path / "ours"))
    torch.testing.assert_close(peft_model(input_ids=input_ids).logits, trained, rtol=1e-5, atol=1e-5)
    theirs = get_peft_model(make_llama(), _peft_cfg(["embed_tokens", "q_proj"])).eval()
    _perturb([p for p in theirs.parameters() if p.requires_grad], seed=2)
    their_logits = theirs(input_ids=input_ids).logits
    theirs.save_pretrained(str(tmp_path / "theirs"))
    ours = LoRAModelWrapper.from_pretrained(make_llama(), str(tmp_path / "theirs"))
    torch.testing.assert_close(ours(input_ids=input_ids).logits, their_logits, rtol=1e-5, atol=1e-5)


def test_errors():
    from hf_lora.dora import dora_class_for
    from hf_lora.layers import LoRALayer

    with pytest.raises(ValueError, match=r"use_dora=True is not supported for module 'x' \(LoRALayer\)"):
        dora_class_for(LoRALayer, "x")
    with pytest.raises(ValueError, match=r"LoRAConfig.use_dora='yes' is invalid: expected True or False"):
        LoRAConfig(use_dora="yes")
    assert LoRAConfig.from_dict({"target_modules": ["q_proj"], "use_dora": True}).use_dora is True


def test_dora_with_pissa_init_is_identity_and_refuses_conversion(tmp_path, input_ids):
    from hf_lora.init import save_as_lora

    expected = make_llama()(input_ids=input_ids).logits
    model = wrap(make_llama(), _cfg(LLAMA, init_lora_weights="pissa", use_rslora=True))
    torch.testing.assert_close(model(input_ids=input_ids).logits, expected, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="cannot convert a DoRA adapter"):
        save_as_lora(model, tmp_path, initial={})
