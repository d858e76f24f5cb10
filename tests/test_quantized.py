"""QLoRA on CPU: LoRA over bitsandbytes ``Linear4bit`` (NF4, double quant) and ``Linear8bitLt``.

The quantized base is frozen: its bytes (and the 4-bit ``absmax`` statistics) must stay
bit-identical through wrap, training, eval forwards, saving and merge/unmerge. On CPUs with
AVX512-BF16, bitsandbytes repacks 4-bit weights during eval forwards and rounds ``absmax``
to bf16; `test_frozen_4bit_base_survives_*` is the guard against that trap.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import VOCAB, load_quantized, make_llama, save_base

from hf_lora import LoRAConfig, LoRAModelWrapper, wrap

bnb = pytest.importorskip("bitsandbytes")
from bitsandbytes.functional import dequantize_4bit, has_avx512bf16

from hf_lora.quantized import LoRALinear4bit, LoRALinear8bit

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
QUANT_CLASS = {4: bnb.nn.Linear4bit, 8: bnb.nn.Linear8bitLt}
LORA_CLASS = {4: LoRALinear4bit, 8: LoRALinear8bit}


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    return save_base(make_llama(), tmp_path_factory.mktemp("llama"))


@pytest.fixture
def ids():
    return torch.randint(0, VOCAB, (2, 8), generator=torch.Generator().manual_seed(7))


def _quantized_layers(model, bits):
    return {p: m for p, m in model.named_modules() if type(m) is QUANT_CLASS[bits]}


def _frozen_bytes(model, bits) -> dict[str, torch.Tensor]:
    """Every byte that defines the quantized base: codes plus scales / absmax statistics."""
    out = {}
    for path, layer in _quantized_layers(model, bits).items():
        path = path.replace(".base_layer", "")  # same key before and after wrap
        weight = layer.weight
        out[f"{path}.codes"] = weight.data.clone()
        if bits == 4:
            state = weight.quant_state
            out[f"{path}.absmax"] = state.absmax.clone()
            if state.nested:
                out[f"{path}.absmax2"] = state.state2.absmax.clone()
                out[f"{path}.offset"] = state.offset.clone()
        else:
            scale = weight.SCB if weight.SCB is not None else layer.state.SCB
            out[f"{path}.SCB"] = scale.clone()
    for name, param in model.named_parameters():
        if "lora_" not in name and not isinstance(param, (bnb.nn.Params4bit, bnb.nn.Int8Params)):
            out[name.replace(".base_layer", "")] = param.detach().clone()
    return out


def _assert_same_bytes(before, after):
    assert before.keys() == after.keys()
    for key, value in before.items():
        assert after[key].dtype == value.dtype, key
        assert torch.equal(after[key], value), key


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def _base_logits(model, ids, bits):
    """Eval-mode logits of the unwrapped base, leaving it exactly as loaded.

    A 4-bit base runs in train mode (bitsandbytes only repacks in eval mode; both compute the
    same); 8-bit outputs differ between modes, so it runs in eval mode, which is harmless there.
    """
    model.train(bits == 4)
    out = _logits(model, ids)
    model.eval()
    return out


def _train_step(wrapper, ids):
    wrapper.train()
    optimizer = torch.optim.AdamW([p for p in wrapper.parameters() if p.requires_grad], lr=1e-2)
    out = wrapper(input_ids=ids, labels=ids)
    out.loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    wrapper.eval()


@pytest.mark.parametrize("bits", [4, 8])
def test_wrap_forward_and_fresh_adapter_is_exact(base_dir, ids, bits):
    model = load_quantized(base_dir, bits)
    base = _base_logits(model, ids, bits)
    wrapper = wrap(model, LoRAConfig(target_modules=["attention", "mlp"]))
    layers = [m for m in model.modules() if isinstance(m, LORA_CLASS[bits])]
    assert len(layers) == 14 and all(type(m.base_layer) is QUANT_CLASS[bits] for m in layers)
    assert all(m.lora_A.weight.dtype == torch.float32 for m in layers)
    assert torch.equal(_logits(wrapper, ids), base)


@pytest.mark.parametrize("bits", [4, 8])
def test_one_optimizer_step_moves_adapter_and_not_the_base(base_dir, ids, bits):
    model = load_quantized(base_dir, bits)
    before = _frozen_bytes(model, bits)
    wrapper = wrap(model, LoRAConfig(target_modules=["attention", "mlp"]))
    adapter_before = {k: v.detach().clone() for k, v in wrapper.adapter_parameters().items()}
    _train_step(wrapper, ids)
    moved = [k for k, v in wrapper.adapter_parameters().items() if not torch.equal(v, adapter_before[k])]
    assert any("lora_B" in k for k in moved) and any("lora_A" in k for k in moved)
    _assert_same_bytes(before, _frozen_bytes(model, bits))


@pytest.mark.parametrize("bits", [4, 8])
def test_random_adapter_merge_is_close_warns_and_unmerge_restores_bit_exactly(base_dir, ids, bits):
    model = load_quantized(base_dir, bits)
    base = _base_logits(model, ids, bits)
    wrapper = wrap(model, LoRAConfig(init_lora_weights=False))
    layer = model.model.layers[0].self_attn.q_proj
    expected_weight = layer.read_base_weight() + layer.delta_weight()
    unmerged = _logits(wrapper, ids)
    before = _frozen_bytes(model, bits)
    with pytest.warns(UserWarning, match=rf"{bits}-bit base requantizes the merged weight"):
        wrapper.merge(keep_original=False)  # quantized kinds keep the original regardless
    merged_bytes = _frozen_bytes(model, bits)
    # weight level: the merged base is W + delta up to one quantization step of its block
    error = (layer.read_base_weight() - expected_weight).abs().max()
    assert error <= (0.15 if bits == 4 else 0.01) * expected_weight.abs().max()
    # output level: rounding is small next to what the adapter does
    effect = (unmerged - base).abs().max()
    assert effect > 0.1  # a random adapter changes the outputs
    assert (_logits(wrapper, ids) - unmerged).abs().max() < (0.5 if bits == 4 else 0.05) * effect
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        wrapper.merge()  # no-op: no second requantization, no warning
    _assert_same_bytes(merged_bytes, _frozen_bytes(model, bits))
    wrapper.unmerge()
    _assert_same_bytes(before, _frozen_bytes(model, bits))
    assert torch.equal(_logits(wrapper, ids), unmerged)


@pytest.mark.parametrize("bits", [4, 8])
def test_disable_adapter_and_merge_and_unload(base_dir, ids, bits):
    model = load_quantized(base_dir, bits)
    classes = [(p, type(m)) for p, m in model.named_modules()]
    base = _base_logits(model, ids, bits)
    wrapper = wrap(model, LoRAConfig(init_lora_weights=False))
    with wrapper.disable_adapter():
        assert torch.equal(_logits(wrapper, ids), base)
    adapted = _logits(wrapper, ids)
    plain = wrapper.merge_and_unload()
    assert [(p, type(m)) for p, m in plain.named_modules()] == classes
    assert (_logits(plain, ids) - adapted).abs().max() < (0.5 if bits == 4 else 0.05) * (adapted - base).abs().max()


@pytest.mark.parametrize("bits", [4, 8])
def test_save_and_load_on_a_quantized_base(base_dir, ids, bits, tmp_path):
    wrapper = wrap(load_quantized(base_dir, bits), LoRAConfig(init_lora_weights=False))
    wrapper.save_pretrained(str(tmp_path))
    loaded = LoRAModelWrapper.from_pretrained(load_quantized(base_dir, bits), str(tmp_path))
    assert torch.equal(_logits(loaded, ids), _logits(wrapper, ids))


def test_4bit_parameter_count_is_unpacked(base_dir, capsys):
    wrapper = wrap(load_quantized(base_dir, 4))
    trainable, total = wrapper.trainable_parameters()
    assert trainable == 16384
    assert total == sum(p.numel() for p in make_llama().parameters()) + trainable


def test_frozen_4bit_base_survives_wrap_train_eval_save_and_merge(base_dir, ids, tmp_path):
    model = load_quantized(base_dir, 4)
    before = _frozen_bytes(model, 4)  # as loaded, before any forward
    wrapper = wrap(model, LoRAConfig(target_modules=["attention"]))  # MLP layers stay plain Linear4bit
    quantized = _quantized_layers(model, 4)
    assert len(quantized) == 14
    assert all(layer.support_avx512bf16_for_cpu is False for layer in quantized.values())
    _train_step(wrapper, ids)
    _logits(wrapper.eval(), ids)  # eval forward without grad: where bitsandbytes would repack
    wrapper.save_pretrained(str(tmp_path))
    wrapper.state_dict()
    wrapper.merge()
    _logits(wrapper, ids)
    wrapper.unmerge()
    _logits(wrapper, ids)
    _assert_same_bytes(before, _frozen_bytes(model, 4))
    assert not any(getattr(q.weight.quant_state, "packing_format_for_cpu", False) for q in quantized.values())


@pytest.mark.skipif(not has_avx512bf16(), reason="the repacking trap exists only on CPUs with AVX512-BF16")
def test_the_trap_is_real_here_and_wrap_repairs_a_repacked_base(base_dir, ids):
    model = load_quantized(base_dir, 4)
    before = _frozen_bytes(model, 4)
    expected = _logits(model, ids)  # an eval forward of the unwrapped base: bitsandbytes repacks it
    assert model.model.layers[0].mlp.up_proj.weight.quant_state.packing_format_for_cpu  # the base changed form
    with pytest.warns(UserWarning, match=r"already repacked 14 4-bit layer\(s\).*rounds their absmax to bf16"):
        wrapper = wrap(model, LoRAConfig(target_modules=["attention", "mlp"], init_lora_weights=False))
    layer = model.model.layers[0].mlp.up_proj
    state = layer.base_layer.weight.quant_state
    assert not state.packing_format_for_cpu and state.nested
    codes_after = _frozen_bytes(model, 4)
    assert torch.equal(codes_after["model.layers.0.mlp.up_proj.codes"],
                       before["model.layers.0.mlp.up_proj.codes"])  # layout restored; absmax stays rounded
    dequantized = dequantize_4bit(layer.base_layer.weight.data, state)
    assert dequantized.shape == (128, 64)
    with wrapper.disable_adapter():
        torch.testing.assert_close(_logits(wrapper, ids), expected, atol=1e-2, rtol=1e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("bits", [4, 8])
def test_cuda_qlora_step_merge_and_bit_exact_unmerge(base_dir, ids, bits):
    """The CUDA kernels of bitsandbytes store their state differently from the CPU backend."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    q = (BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                            bnb_4bit_compute_dtype=torch.bfloat16) if bits == 4 else BitsAndBytesConfig(load_in_8bit=True))
    model = AutoModelForCausalLM.from_pretrained(base_dir, quantization_config=q, device_map="cuda").eval()
    ids = ids.cuda()
    before = _frozen_bytes(model, bits)
    wrapper = wrap(model, LoRAConfig(init_lora_weights=False))
    _train_step(wrapper, ids)
    _assert_same_bytes(before, _frozen_bytes(model, bits))
    unmerged = _logits(wrapper, ids)
    wrapper.merge()
    assert (_logits(wrapper, ids) - unmerged).abs().max() < 0.5 * unmerged.abs().max()
    wrapper.unmerge()
    _assert_same_bytes(before, _frozen_bytes(model, bits))
    assert torch.equal(_logits(wrapper, ids), unmerged)
