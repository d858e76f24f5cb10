"""PiSSA / pissa_niter_N / OLoRA inits: residual base, unchanged outputs, conversion to plain LoRA, PEFT parity."""

from __future__ import annotations

import warnings

import pytest
import torch

from hf_lora import LoRAConfig, LoRAModelWrapper, wrap
from hf_lora.init import initial_adapter_tensors, save_as_lora, save_residual_base
from tests.conftest import make_gpt2, make_llama, save_base

INITS = ["pissa", "pissa_niter_4", "olora"]
LLAMA_TARGETS = ["q_proj", "v_proj", "down_proj"]


def _cfg(init, **kw):
    base = dict(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=LLAMA_TARGETS, init_lora_weights=init)
    base.update(kw)
    return LoRAConfig(**base)


def _perturb(model, seed=3, size=0.05):
    """Stand-in for training: move every adapter tensor."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.adapter_parameters().values():
            p.add_(size * torch.randn(p.shape, generator=gen))


def _make(kind):
    return make_llama() if kind == "llama" else make_gpt2()


def _targets(kind):
    return LLAMA_TARGETS if kind == "llama" else ["c_attn", "c_fc"]


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
@pytest.mark.parametrize("init", INITS)
def test_fresh_adapter_keeps_outputs_and_base_holds_residual(kind, init, input_ids):
    original = _make(kind)
    expected = original(input_ids=input_ids).logits
    weights = {n: p.detach().clone() for n, p in original.named_parameters()}
    model = wrap(original, _cfg(init, target_modules=_targets(kind)))
    torch.testing.assert_close(model(input_ids=input_ids).logits, expected, rtol=1e-4, atol=1e-4)
    layers = [(p, m) for p, m in model.base_model.named_modules() if hasattr(m, "lora_A")]
    assert layers
    for path, layer in layers:
        w0 = weights[f"{path}.weight"]
        residual = layer.base_layer.weight.detach()
        assert (residual - w0).abs().max() > 1e-2, f"{path}: base not rewritten"
        torch.testing.assert_close(residual + layer.delta_weight(), w0, rtol=1e-5, atol=1e-5)
        assert torch.count_nonzero(layer.lora_B.weight) > 0  # both factors are non-zero, unlike plain LoRA


def test_pissa_takes_the_principal_components():
    model = wrap(make_llama(), _cfg("pissa"))
    layer = model.base_model.model.layers[0].self_attn.q_proj
    w0 = layer.base_layer.weight.detach() + layer.delta_weight()
    top = torch.linalg.svdvals(w0)[:4]
    torch.testing.assert_close(torch.linalg.svdvals(layer.delta_weight())[:4], top, rtol=1e-4, atol=1e-5)
    # the residual keeps the rest of the spectrum
    torch.testing.assert_close(torch.linalg.svdvals(layer.base_layer.weight)[:4], torch.linalg.svdvals(w0)[4:8], rtol=1e-4, atol=1e-5)


def _llama_with_spectrum():
    """Pretrained weights have decaying spectra (random init does not): plant one in down_proj."""
    model = make_llama()
    gen = torch.Generator().manual_seed(0)
    u, _ = torch.linalg.qr(torch.randn(64, 64, generator=gen))
    v, _ = torch.linalg.qr(torch.randn(128, 64, generator=gen))
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight.copy_(u @ torch.diag(0.5 ** torch.arange(64.0)) @ v.T)
    return model


def test_pissa_niter_approximates_pissa():
    exact = wrap(_llama_with_spectrum(), _cfg("pissa")).base_model.model.layers[0].mlp.down_proj.delta_weight()
    fast = wrap(_llama_with_spectrum(), _cfg("pissa_niter_4")).base_model.model.layers[0].mlp.down_proj.delta_weight()
    assert (fast - exact).norm() / exact.norm() < 0.05


def test_olora_b_is_orthonormal():
    layer = wrap(make_llama(), _cfg("olora")).base_model.model.layers[1].self_attn.v_proj
    b = layer.lora_B.weight.detach()
    torch.testing.assert_close(b.T @ b, torch.eye(4), rtol=0, atol=1e-5)


@pytest.mark.parametrize("init", INITS)
def test_merge_equals_unmerged(init, input_ids):
    model = wrap(make_llama(), _cfg(init))
    _perturb(model)
    unmerged = model(input_ids=input_ids).logits
    model.merge()
    torch.testing.assert_close(model(input_ids=input_ids).logits, unmerged, rtol=1e-4, atol=1e-4)
    model.unmerge()
    torch.testing.assert_close(model(input_ids=input_ids).logits, unmerged, rtol=0, atol=0)


@pytest.mark.parametrize(("kind", "init"), [("llama", "pissa"), ("llama", "olora"), ("gpt2", "pissa_niter_4")])
def test_converted_adapter_on_original_base_gives_finetuned_logits(kind, init, tmp_path, input_ids):
    from peft import PeftModel

    from hf_lora.fingerprint import BaseMismatchWarning

    warnings.simplefilter("error", BaseMismatchWarning)  # the converted file must not claim the residual base

    original_logits = _make(kind)(input_ids=input_ids).logits
    model = wrap(_make(kind), _cfg(init, target_modules=_targets(kind), use_rslora=True, rank_pattern={_targets(kind)[0]: 2}))
    model.save_pretrained(str(tmp_path / "init"))  # the adapter right after init, PEFT's workflow
    in_memory = initial_adapter_tensors(model)
    _perturb(model)
    finetuned = model(input_ids=input_ids).logits
    assert (finetuned - original_logits).abs().max() > 1e-3
    save_as_lora(model, tmp_path / "lora", initial=tmp_path / "init")
    ours = LoRAModelWrapper.from_pretrained(_make(kind), str(tmp_path / "lora"))  # ORIGINAL base
    assert ours.lora_config.r == 8 and ours.lora_config.init_lora_weights is True
    torch.testing.assert_close(ours(input_ids=input_ids).logits, finetuned, rtol=1e-4, atol=1e-4)
    peft_model = PeftModel.from_pretrained(_make(kind), str(tmp_path / "lora"))
    torch.testing.assert_close(peft_model(input_ids=input_ids).logits, finetuned, rtol=1e-4, atol=1e-4)
    model.save_pretrained(str(tmp_path / "lora3"), path_initial_model_for_weight_conversion=str(tmp_path / "init"))
    peft_style = LoRAModelWrapper.from_pretrained(_make(kind), str(tmp_path / "lora3"))
    torch.testing.assert_close(peft_style(input_ids=input_ids).logits, finetuned, rtol=1e-4, atol=1e-4)
    save_as_lora(model, tmp_path / "lora2", initial=in_memory)  # same result from an in-memory snapshot
    again = LoRAModelWrapper.from_pretrained(_make(kind), str(tmp_path / "lora2"))
    torch.testing.assert_close(again(input_ids=input_ids).logits, finetuned, rtol=1e-4, atol=1e-4)


def test_saved_pissa_adapter_reloads_on_residual_base_without_redecomposing(tmp_path, input_ids):
    from transformers import AutoModelForCausalLM

    model = wrap(make_llama(), _cfg("pissa"))
    _perturb(model)
    expected = model(input_ids=input_ids).logits
    model.save_pretrained(str(tmp_path / "adapter"))
    save_residual_base(model, tmp_path / "residual")
    residual = AutoModelForCausalLM.from_pretrained(str(tmp_path / "residual")).eval()
    loaded = LoRAModelWrapper.from_pretrained(residual, str(tmp_path / "adapter"))
    torch.testing.assert_close(loaded(input_ids=input_ids).logits, expected, rtol=0, atol=0)


def test_peft_loads_our_pissa_files(tmp_path, input_ids):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = wrap(make_llama(), _cfg("pissa"))
    _perturb(model)
    expected = model(input_ids=input_ids).logits
    model.save_pretrained(str(tmp_path / "adapter"))
    save_residual_base(model, tmp_path / "residual")
    residual = AutoModelForCausalLM.from_pretrained(str(tmp_path / "residual")).eval()
    peft_model = PeftModel.from_pretrained(residual, str(tmp_path / "adapter"))
    torch.testing.assert_close(peft_model(input_ids=input_ids).logits, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_we_load_peft_pissa_files_and_init_matches(kind, tmp_path, input_ids):
    from peft import LoraConfig, get_peft_model

    targets = _targets(kind)
    peft_model = get_peft_model(_make(kind), LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=targets,
                                                        init_lora_weights="pissa", fan_in_fan_out=kind == "gpt2"))
    ours = wrap(_make(kind), _cfg("pissa", target_modules=targets))
    peft_layer = peft_model.base_model.model.get_submodule(next(p for p, m in ours.base_model.named_modules() if hasattr(m, "lora_A")))
    our_layer = ours.base_model.get_submodule(next(p for p, m in ours.base_model.named_modules() if hasattr(m, "lora_A")))
    torch.testing.assert_close(our_layer.lora_A.weight, peft_layer.lora_A["default"].weight, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(our_layer.base_layer.weight, peft_layer.base_layer.weight, rtol=1e-4, atol=1e-5)
    with torch.no_grad():
        for p in peft_model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    expected = peft_model.eval()(input_ids=input_ids).logits
    peft_model.save_pretrained(str(tmp_path))  # PEFT writes init_lora_weights="pissa"
    residual = peft_model.unload()  # residual weights, adapters removed without merging
    loaded = LoRAModelWrapper.from_pretrained(residual, str(tmp_path))
    torch.testing.assert_close(loaded(input_ids=input_ids).logits, expected, rtol=1e-5, atol=1e-5)


def test_refusals_leave_the_model_untouched():
    model = make_llama()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match=r"init_lora_weights='pissa' .*'model.embed_tokens' gets a LoRAEmbedding"):
        wrap(model, _cfg("pissa", target_modules=["q_proj", "embed_tokens"]))
    tied = make_llama(tie_word_embeddings=True)
    with pytest.raises(ValueError, match=r"'lm_head', which is tied"):
        wrap(tied, _cfg("olora", target_modules=["lm_head"]))
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())
    with pytest.raises(ValueError, match=r"init_lora_weights='pissa_niter_0' is invalid"):
        LoRAConfig(init_lora_weights="pissa_niter_0")


def test_quantized_base_refused(tmp_path):
    from tests.conftest import load_quantized, save_base

    q = load_quantized(save_base(make_llama(), tmp_path / "b"), 4)
    with pytest.raises(ValueError, match=r"quantized module 'model.layers.0.self_attn.q_proj'"):
        wrap(q, _cfg("pissa"))


def test_conversion_errors(tmp_path):
    model = wrap(make_llama(), _cfg("pissa"))
    other = initial_adapter_tensors(wrap(make_llama(), _cfg("pissa", r=2)))
    with pytest.raises(ValueError, match=r"Initial tensor .* has shape \(2, 64\), the adapter has \(4, 64\)"):
        save_as_lora(model, tmp_path / "x", initial=other)
    with pytest.raises(ValueError, match=r"has no tensor"):
        save_as_lora(model, tmp_path / "x", initial={})


def test_qpissa_workflow_quantizes_only_the_residual(tmp_path, input_ids):
    """QPiSSA: decompose in full precision, quantize the residual, load the adapter on it.

    The principal part stays in the fp32 adapter, so the 4-bit model is closer to the original
    than plain 4-bit quantization (QLoRA's starting point), as the PiSSA paper reports.
    """
    from tests.conftest import load_quantized

    original = make_llama()(input_ids=input_ids).logits
    qlora_start = load_quantized(save_base(make_llama(), tmp_path / "base"), 4)(input_ids=input_ids).logits
    model = wrap(make_llama(), _cfg("pissa", r=16, lora_alpha=16, target_modules="all-linear"))
    model.save_pretrained(str(tmp_path / "adapter"))
    save_residual_base(model, tmp_path / "residual")
    qpissa = LoRAModelWrapper.from_pretrained(load_quantized(str(tmp_path / "residual"), 4), str(tmp_path / "adapter"), is_trainable=True)
    layer = qpissa.base_model.model.layers[0].self_attn.q_proj
    assert type(layer).__name__ == "LoRALinear4bit" and layer.lora_A.weight.requires_grad
    torch.testing.assert_close(layer.lora_A.weight, model.base_model.model.layers[0].self_attn.q_proj.lora_A.weight, rtol=0, atol=0)
    qpissa_err = (qpissa(input_ids=input_ids).logits - original).abs().mean()
    qlora_err = (qlora_start - original).abs().mean()
    assert qpissa_err < 0.8 * qlora_err  # measured: 0.0087 vs 0.0165
