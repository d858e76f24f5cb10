"""Numeric invariants of every non-quantized LoRA layer kind, checked on whole tiny models.

Each case is a (model, config) pair that puts adapters on one layer kind: ``nn.Linear``
(LLaMA attention + MLP), ``nn.Embedding`` (LLaMA ``embed_tokens``), transformers ``Conv1D``
(GPT-2) and BERT with trained biases and a ``modules_to_save`` classifier head.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from conftest import VOCAB, make_bert, make_gpt2, make_llama
from torch import nn

from hf_lora import LoRAConfig, wrap
from hf_lora.layers import LoRAConv1D, LoRAEmbedding, LoRALayer, LoRALinear, TrainedCopy


@dataclass(frozen=True)
class Case:
    make: Callable[[], nn.Module]
    config: dict
    lora_class: type[LoRALayer]
    n_layers: int  # how many LoRA layers wrap must inject


CASES = {
    "llama-linear": Case(make_llama, {"target_modules": ["attention", "mlp"]}, LoRALinear, 14),
    "llama-embedding": Case(make_llama, {"target_modules": ["embedding"]}, LoRAEmbedding, 1),
    "gpt2-conv1d": Case(make_gpt2, {"target_modules": ["attention", "mlp"]}, LoRAConv1D, 8),
    "bert-bias-all": Case(
        make_bert, {"target_modules": ["attention"], "bias": "all", "modules_to_save": ["classifier"]}, LoRALinear, 8
    ),
    "bert-lora-only": Case(
        make_bert, {"target_modules": ["attention"], "bias": "lora_only", "modules_to_save": ["classifier"]},
        LoRALinear, 8,
    ),
}


def _inputs() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(3)
    ids = torch.randint(0, VOCAB, (2, 10), generator=generator)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


@torch.no_grad()
def _logits(model: nn.Module) -> torch.Tensor:
    return model(**_inputs()).logits


def _weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: t.detach().clone() for name, t in model.state_dict().items()}


def _build(name: str, **overrides) -> tuple[nn.Module, nn.Module, torch.Tensor]:
    """(wrapper, the base model object, logits of the base before wrapping)."""
    case = CASES[name]
    base = case.make()
    before = _logits(base)
    wrapper = wrap(base, LoRAConfig(**{**case.config, **overrides}))
    if overrides.get("init_lora_weights") is False:
        # modules_to_save copies start equal to the original: move them so their use shows.
        for module in base.modules():
            if isinstance(module, TrainedCopy):
                with torch.no_grad():
                    for param in module.trained_module.parameters():
                        param.add_(0.5)
    return wrapper, base, before


def _base_weights_of_lora_layers(base: nn.Module) -> dict[str, torch.Tensor]:
    return {
        path: m.base_layer.weight.detach().clone()
        for path, m in base.named_modules()
        if isinstance(m, LoRALayer)
    }


@pytest.mark.parametrize("name", CASES)
def test_injects_expected_layers(name):
    _, base, _ = _build(name)
    layers = [m for m in base.modules() if isinstance(m, LoRALayer)]
    assert len(layers) == CASES[name].n_layers
    assert {type(m) for m in layers} == {CASES[name].lora_class}


@pytest.mark.parametrize("name", CASES)
def test_fresh_adapter_is_exactly_the_base(name):
    wrapper, _, before = _build(name)
    assert torch.equal(_logits(wrapper), before)


@pytest.mark.parametrize("init", ["gaussian", True])
def test_fresh_adapter_is_exact_for_every_zero_init(init):
    wrapper, _, before = _build("llama-linear", init_lora_weights=init)
    assert torch.equal(_logits(wrapper), before)


@pytest.mark.parametrize("name", CASES)
def test_random_init_changes_outputs(name):
    wrapper, _, before = _build(name, init_lora_weights=False)
    assert (_logits(wrapper) - before).abs().max() > 1e-3


@pytest.mark.parametrize("name", CASES)
def test_merge_equals_unmerged_and_unmerge_restores_bit_exactly(name):
    wrapper, base, _ = _build(name, init_lora_weights=False)
    unmerged = _logits(wrapper)
    originals = _base_weights_of_lora_layers(base)
    wrapper.merge()
    merged_weights = _base_weights_of_lora_layers(base)
    assert any(not torch.equal(merged_weights[p], originals[p]) for p in originals)
    torch.testing.assert_close(_logits(wrapper), unmerged, atol=2e-5, rtol=1e-5)
    wrapper.merge()  # idempotent: a second merge must not add the delta again
    for path, weight in _base_weights_of_lora_layers(base).items():
        assert torch.equal(weight, merged_weights[path]), path
    wrapper.unmerge()
    for path, weight in _base_weights_of_lora_layers(base).items():
        assert torch.equal(weight, originals[path]), path
    wrapper.unmerge()  # idempotent too
    assert torch.equal(_logits(wrapper), unmerged)


@pytest.mark.parametrize("name", CASES)
def test_unmerge_without_original_copy_is_close(name):
    wrapper, base, _ = _build(name, init_lora_weights=False)
    originals = _base_weights_of_lora_layers(base)
    unmerged = _logits(wrapper)
    wrapper.merge(keep_original=False)
    assert all(m._original_weight is None for m in base.modules() if isinstance(m, LoRALayer))
    wrapper.unmerge()
    for path, weight in _base_weights_of_lora_layers(base).items():
        torch.testing.assert_close(weight, originals[path], atol=1e-6, rtol=0)
    torch.testing.assert_close(_logits(wrapper), unmerged, atol=2e-5, rtol=1e-5)


def test_merge_adds_exactly_scaled_BA_to_the_linear_weight():
    wrapper, base, _ = _build("llama-linear", init_lora_weights=False, lora_alpha=4, r=2)
    layer = base.model.layers[0].self_attn.q_proj
    before = layer.base_layer.weight.detach().clone()
    expected = before + (layer.lora_B.weight @ layer.lora_A.weight) * (4 / 2)
    wrapper.merge()
    torch.testing.assert_close(layer.base_layer.weight, expected, atol=1e-6, rtol=0)


def test_conv1d_delta_is_transposed_into_fan_in_fan_out_layout():
    _, base, _ = _build("gpt2-conv1d", init_lora_weights=False)
    layer = base.transformer.h[0].attn.c_attn
    assert layer.base_layer.weight.shape == (64, 192)  # in x out
    assert layer.lora_A.weight.shape == (8, 64) and layer.lora_B.weight.shape == (192, 8)
    x = torch.randn(3, 64)
    delta = layer.delta_weight()
    torch.testing.assert_close(layer(x), layer.base_layer(x) + x @ delta, atol=1e-5, rtol=1e-5)


def test_embedding_adapter_shapes_follow_peft_layout():
    _, base, _ = _build("llama-embedding")
    layer = base.model.embed_tokens
    assert layer.lora_embedding_A.shape == (8, VOCAB)
    assert layer.lora_embedding_B.shape == (64, 8)
    assert torch.count_nonzero(layer.lora_embedding_A) == 0  # zero A: a fresh adapter is the identity


@pytest.mark.parametrize("name", CASES)
def test_merge_and_unload_returns_plain_model_with_same_logits(name):
    case = CASES[name]
    classes_before = [(p, type(m)) for p, m in case.make().named_modules()]
    wrapper, base, _ = _build(name, init_lora_weights=False)
    adapted = _logits(wrapper)
    plain = wrapper.merge_and_unload()
    assert plain is base
    assert [(p, type(m)) for p, m in plain.named_modules()] == classes_before
    torch.testing.assert_close(_logits(plain), adapted, atol=2e-5, rtol=1e-5)
    with pytest.raises(RuntimeError, match="unloaded"):
        wrapper.merge()


@pytest.mark.parametrize("name", CASES)
@pytest.mark.parametrize("merged", [False, True], ids=["unmerged", "merged"])
def test_disable_adapter_gives_base_outputs_and_restores(name, merged):
    wrapper, base, before = _build(name, init_lora_weights=False)
    if merged:
        wrapper.merge()
    adapted = _logits(wrapper)
    weights = _weights(base)
    with wrapper.disable_adapter():
        torch.testing.assert_close(_logits(wrapper), before, atol=2e-5, rtol=1e-5)
    assert all(m.merged == merged for m in base.modules() if isinstance(m, LoRALayer))
    assert torch.equal(_logits(wrapper), adapted)
    after = _weights(base)
    assert after.keys() == weights.keys()
    for key, value in weights.items():
        assert torch.equal(after[key], value), key


def test_disable_adapter_restores_even_when_the_body_raises():
    wrapper, base, _ = _build("llama-linear", init_lora_weights=False)
    adapted = _logits(wrapper)
    with pytest.raises(KeyError), wrapper.disable_adapter():
        raise KeyError("boom")
    assert not any(m.disabled for m in base.modules() if isinstance(m, LoRALayer))
    assert torch.equal(_logits(wrapper), adapted)


def test_merge_refuses_non_finite_results_and_changes_nothing():
    _, base, _ = _build("llama-linear", init_lora_weights=False)
    layer = base.model.layers[1].mlp.down_proj
    with torch.no_grad():
        layer.lora_B.weight[0, 0] = float("inf")
    weight = layer.base_layer.weight.detach().clone()
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.down_proj.*NaN or inf"):
        layer.merge()
    assert not layer.merged and torch.equal(layer.base_layer.weight, weight)


def _half_layer(dtype: torch.dtype) -> LoRALinear:
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(16, 12, bias=False).to(dtype), r=4, scaling=2.0, dropout=0.0, init=False)
    return layer


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_merge_is_fp32_maths_rounded_once_into_the_base_dtype(dtype):
    layer = _half_layer(dtype)
    weight = layer.base_layer.weight.detach().clone()
    expected = (weight.float() + layer.delta_weight()).to(dtype)
    layer.merge(keep_original=False)
    assert layer.base_layer.weight.dtype == dtype
    assert torch.equal(layer.base_layer.weight, expected)
    layer.unmerge()  # by subtraction: exact up to one rounding of the base dtype
    expected_back = (expected.float() - layer.delta_weight()).to(dtype)
    assert torch.equal(layer.base_layer.weight, expected_back)


def test_merge_refuses_an_fp16_overflow_and_changes_nothing():
    layer = _half_layer(torch.float16)
    with torch.no_grad():  # every delta entry: 2 * 4 * 200 * 200 = 320000 > 65504 (fp16's max)
        layer.lora_A.weight.fill_(200.0)
        layer.lora_B.weight.fill_(200.0)
    weight = layer.base_layer.weight.detach().clone()
    with pytest.raises(ValueError, match="NaN or inf weights"):
        layer.merge(keep_original=False)
    assert not layer.merged and torch.equal(layer.base_layer.weight, weight)


def test_merge_near_the_dtype_limit_takes_the_checked_path_and_is_exact():
    # max|W| + max|delta| exceeds fp16's range, but the sum itself does not: the in-place
    # shortcut cannot prove that, so the merged copy is built and checked instead.
    layer = _half_layer(torch.float16)
    with torch.no_grad():
        layer.base_layer.weight[0, 0] = 60000.0
        layer.lora_A.weight.zero_()
        layer.lora_B.weight.zero_()
        layer.lora_A.weight[0, 0] = 100.0
        layer.lora_B.weight[0, 0] = -40.0  # delta[0, 0] = 2 * 100 * -40 = -8000
    weight = layer.base_layer.weight.detach().clone()
    expected = (weight.float() + layer.delta_weight()).to(torch.float16)
    layer.merge()
    assert layer.base_layer.weight[0, 0].item() == 52000.0  # exact in fp16 (a multiple of 32)
    assert torch.equal(layer.base_layer.weight, expected)
    layer.unmerge()
    assert torch.equal(layer.base_layer.weight, weight)


def test_failed_model_merge_leaves_every_layer_unmerged():
    wrapper, base, _ = _build("llama-linear", init_lora_weights=False)
    before = _base_weights_of_lora_layers(base)
    with torch.no_grad():  # the last layer in module order fails, after 13 good merges
        base.model.layers[1].mlp.down_proj.lora_A.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"merge of LoRA layer 'model\.layers\.1\.mlp\.down_proj'"):
        wrapper.merge()
    assert not any(m.merged for m in base.modules() if isinstance(m, LoRALayer))
    for path, weight in _base_weights_of_lora_layers(base).items():
        assert torch.equal(weight, before[path]), path


def test_scaling_multiplies_the_update_and_rslora_uses_sqrt_r():
    _, base, _ = _build("llama-linear", r=4, lora_alpha=8, use_rslora=True)
    layer = base.model.layers[0].self_attn.q_proj
    assert layer.scaling == pytest.approx(8 / 2)
    _, base2, _ = _build("llama-linear", r=4, lora_alpha=8)
    assert base2.model.layers[0].self_attn.q_proj.scaling == pytest.approx(2.0)


@pytest.mark.parametrize("name", CASES)
def test_optimizer_step_moves_exactly_the_trainable_parameters(name):
    wrapper, _, _ = _build(name)
    wrapper.train()
    frozen = {n: p.detach().clone() for n, p in wrapper.named_parameters() if not p.requires_grad}
    trainable = {n: p.detach().clone() for n, p in wrapper.named_parameters() if p.requires_grad}
    optimizer = torch.optim.AdamW([p for p in wrapper.parameters() if p.requires_grad], lr=1e-2)
    inputs = _inputs()
    labels = inputs["input_ids"] if name.startswith(("llama", "gpt2")) else torch.tensor([0, 2])
    wrapper(**inputs, labels=labels).loss.backward()
    assert all(p.grad is None for n, p in wrapper.named_parameters() if n in frozen)
    optimizer.step()
    for n, p in wrapper.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n
    moved = [n for n, p in wrapper.named_parameters() if n in trainable and not torch.equal(p, trainable[n])]
    # B starts at zero (A for embeddings): one step moves B, and then A, B both carry gradient
    assert any("lora_B" in n or "lora_embedding_A" in n for n in moved)
    if "bias" in name:
        assert any(n.endswith("bias") for n in moved) and any("classifier" in n for n in moved)


def test_bf16_base_keeps_fp32_adapters_and_restores_exactly():
    base = make_llama().to(torch.bfloat16)
    ids = _inputs()["input_ids"]
    with torch.no_grad():
        before = base(input_ids=ids).logits
    wrapper = wrap(base, LoRAConfig(init_lora_weights=False))
    layer = base.model.layers[0].mlp.up_proj
    assert layer.lora_A.weight.dtype == torch.float32 and layer.base_layer.weight.dtype == torch.bfloat16
    original = layer.base_layer.weight.detach().clone()
    with torch.no_grad():
        adapted = wrapper(input_ids=ids).logits
        assert adapted.dtype == torch.bfloat16 and not torch.equal(adapted, before)
        wrapper.merge()
        assert layer.base_layer.weight.dtype == torch.bfloat16
        merged = wrapper(input_ids=ids).logits
        wrapper.unmerge()
    assert torch.equal(layer.base_layer.weight, original)
    # bf16 rounding of the merged weight: small next to what the adapter does
    assert (merged - adapted).abs().max() < 0.1 * (adapted - before).abs().max()
