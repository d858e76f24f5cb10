"""The fast adapter path (hf_lora/fused.py) computes the plain formula: outputs and gradients."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import load_quantized, make_llama, save_base
from torch import nn

from hf_lora import LoRAConfig, fused, wrap
from hf_lora.layers import LoRALinear


def make_layer(p: float = 0.0, in_f: int = 24, out_f: int = 20, r: int = 4, bias: bool = True) -> LoRALinear:
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(in_f, out_f, bias=bias), r=r, scaling=2.5, dropout=p, init=False)
    layer.base_layer.requires_grad_(False)
    return layer.train()


def run(layer: LoRALinear, x: torch.Tensor, *, on: bool, seed: int = 7, autocast: bool = False,
        autocast_dtype: torch.dtype = torch.bfloat16):
    """Output and gradients (x, A, B) of one forward/backward, with the fast path on or off."""
    x = x.detach().clone().requires_grad_(True)
    layer.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    with fused.use_fused(on), torch.autocast("cpu", dtype=autocast_dtype, enabled=autocast):
        out = layer(x)
        loss = (out.float() * torch.linspace(-1, 1, out.shape[-1])).sum()
    loss.backward()
    return out.detach(), x.grad, layer.lora_A.weight.grad, layer.lora_B.weight.grad


def reference(layer: LoRALinear, x: torch.Tensor, keep: torch.Tensor | None, p: float):
    """The formula written out by hand, with an explicit keep-mask."""
    x = x.detach().clone().requires_grad_(True)
    a = layer.lora_A.weight.detach().clone().requires_grad_(True)
    b = layer.lora_B.weight.detach().clone().requires_grad_(True)
    dropped = x if keep is None else x * keep / (1 - p)
    out = layer.base_layer(x) + ((dropped @ a.T) * layer.scaling) @ b.T
    (out * torch.linspace(-1, 1, out.shape[-1])).sum().backward()
    return out.detach(), x.grad, a.grad, b.grad


def assert_all_close(got, want, **tol) -> None:
    for name, g, w in zip(("output", "grad x", "grad A", "grad B"), got, want):
        torch.testing.assert_close(g, w, msg=lambda m, n=name: f"{n}: {m}", **tol)


def test_no_dropout_matches_plain_path_and_runs_fused(monkeypatch):
    layer, x = make_layer(0.0), torch.randn(3, 5, 24)
    calls = []
    monkeypatch.setattr(fused, "adapter_update", lambda *a: calls.append(1) or fused_update(*a))
    got = run(layer, x, on=True)
    assert calls == [1]
    assert_all_close(got, run(layer, x, on=False), rtol=1e-5, atol=1e-5)
    assert_all_close(got, reference(layer, x, None, 0.0), rtol=1e-5, atol=1e-5)


fused_update = fused.adapter_update


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_dropout_matches_formula_with_the_seeded_mask(p):
    """Forward and backward both use the mask that the drawn seed names."""
    layer, x = make_layer(p), torch.randn(4, 6, 24)
    torch.manual_seed(7)
    keep = fused.dropout_keep_mask(x.shape, p, fused.draw_seed(), x.device)
    assert 0 < keep.sum() < keep.numel()
    assert_all_close(run(layer, x, on=True, seed=7), reference(layer, x, keep, p), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("p", [0.0, 0.2])
def test_separate_base_output_path_matches_formula(p):
    """A base that cannot run inside the fused node (here: hooked) gets the adapter added on top."""
    layer, x = make_layer(p), torch.randn(3, 5, 24)
    seen = []
    layer.base_layer.register_forward_hook(lambda m, i, o: seen.append(1))
    assert not fused.applies(layer, x, None) and fused.applies(layer, x, layer.base_layer(x))
    torch.manual_seed(7)
    keep = fused.dropout_keep_mask(x.shape, p, fused.draw_seed(), x.device) if p else None
    seen.clear()
    got = run(layer, x, on=True, seed=7)
    assert seen == [1]  # the hooked base ran once, as a module
    assert_all_close(got, reference(layer, x, keep, p), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("p", [0.0, 0.2])
def test_trainable_base_bias_gets_its_gradient(p):
    layer, x = make_layer(p), torch.randn(3, 5, 24)
    layer.base_layer.bias.requires_grad_(True)
    assert fused.applies(layer, x, None)
    run(layer, x, on=True)
    want = torch.linspace(-1, 1, 20) * 15  # d sum(out * w) / d bias = w summed over 3 * 5 rows
    torch.testing.assert_close(layer.base_layer.bias.grad, want, rtol=1e-5, atol=1e-5)


def test_bernoulli_mask_branch_matches_formula(monkeypatch):
    """The branch used off CPU (a seeded bernoulli_ keep-mask), exercised here on CPU."""
    monkeypatch.setattr(fused, "_samples_positions", lambda device: False)
    p = 0.3
    layer, x = make_layer(p), torch.randn(4, 6, 24)
    torch.manual_seed(7)
    keep = fused.dropout_keep_mask(x.shape, p, fused.draw_seed(), x.device)
    assert abs(keep.float().mean().item() - (1 - p)) < 0.1
    assert_all_close(run(layer, x, on=True, seed=7), reference(layer, x, keep, p), rtol=1e-5, atol=1e-5)


def test_dropout_is_deterministic_given_the_seed_and_differs_between_calls():
    layer, x = make_layer(0.3), torch.randn(2, 8, 24)
    first, again = run(layer, x, on=True, seed=3), run(layer, x, on=True, seed=3)
    assert_all_close(first, again, rtol=0, atol=0)
    other = run(layer, x, on=True, seed=4)
    assert not torch.equal(first[0], other[0])
    layer.eval()  # eval: no dropout, matches the plain path exactly
    assert_all_close(run(layer, x, on=True), run(layer, x, on=False), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("p", [0.05, 0.5, 0.9])
def test_mask_is_an_independent_bernoulli_mask(p):
    shape, n = (256, 1000), 256_000
    keep = fused.dropout_keep_mask(shape, p, 11, torch.device("cpu")).reshape(-1).double()
    sigma = math.sqrt(p * (1 - p) / n)
    assert abs(1 - keep.mean().item() - p) < 5 * sigma  # right drop rate
    drop = 1 - keep
    for lag in (1, 2, 1000):  # neighbours and the next row are dropped independently
        joint = (drop[:-lag] * drop[lag:]).mean().item()
        assert abs(joint - p * p) < 5 * math.sqrt(p * p * (1 - p * p) / n)
    other = 1 - fused.dropout_keep_mask(shape, p, 12, torch.device("cpu")).reshape(-1).double()
    assert abs((drop * other).mean().item() - p * p) < 5 * math.sqrt(p * p * (1 - p * p) / n)
    same = fused.dropout_keep_mask(shape, p, 11, torch.device("cpu")).reshape(-1).double()
    assert torch.equal(same, keep)


def test_drop_positions_cover_the_whole_tensor():
    # Tiny tensors often need more than one round of gaps; positions stay sorted and in range.
    for seed in range(50):
        pos = fused.drop_positions(7, 0.6, seed)
        assert pos.numel() == 0 or (pos.min() >= 0 and pos.max() < 7 and torch.all(pos[1:] > pos[:-1]))
    counts = sum(fused.drop_positions(7, 0.6, s).numel() for s in range(2000))
    assert abs(counts / (7 * 2000) - 0.6) < 0.02


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16bit_autocast_matches_plain_path(dtype, monkeypatch):
    calls = []
    monkeypatch.setattr(fused, "adapter_update", lambda *a: calls.append(1) or fused_update(*a))
    layer, x = make_layer(0.0), torch.randn(3, 5, 24)
    got = run(layer, x, on=True, autocast=True, autocast_dtype=dtype)
    want = run(layer, x, on=False, autocast=True, autocast_dtype=dtype)
    assert got[0].dtype == want[0].dtype == dtype
    assert got[1].dtype == torch.float32 and got[2].dtype == torch.float32
    assert calls == [1]  # the fast path ran (once: the second run had it switched off)
    assert_all_close(got, want, rtol=2e-2, atol=2e-2)


def test_bf16_autocast_with_dropout_matches_formula():
    p = 0.2
    layer, x = make_layer(p), torch.randn(3, 5, 24)
    torch.manual_seed(7)
    keep = fused.dropout_keep_mask(x.shape, p, fused.draw_seed(), x.device)
    got = run(layer, x, on=True, autocast=True)
    want = reference(layer, x, keep, p)
    assert_all_close((got[0].float(), *got[1:]), want, rtol=3e-2, atol=3e-2)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16bit_base_with_fp32_adapters(dtype, monkeypatch):
    calls = []
    monkeypatch.setattr(fused, "adapter_update", lambda *a: calls.append(1) or fused_update(*a))
    layer = make_layer(0.0).to(dtype)
    layer.lora_A.float(), layer.lora_B.float()
    x = torch.randn(2, 5, 24, dtype=dtype)
    got, want = run(layer, x, on=True), run(layer, x, on=False)
    assert got[0].dtype == dtype and got[1].dtype == dtype and calls == [1]
    assert_all_close(got, want, rtol=2e-2, atol=2e-2)


def test_no_grad_and_inference_mode_match_plain_path():
    layer, x = make_layer(0.0).eval(), torch.randn(2, 5, 24)
    with torch.no_grad(), fused.use_fused(False):
        want = layer(x)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), want)
    with torch.inference_mode():
        torch.testing.assert_close(layer(x), want)


def test_hooked_adapter_falls_back_to_plain_path():
    layer, x = make_layer(0.0), torch.randn(2, 5, 24)
    seen = []
    layer.lora_A.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    assert not fused.applies(layer, x, layer.base_layer(x))
    assert_all_close(run(layer, x, on=True), reference(layer, x, None, 0.0), rtol=1e-5, atol=1e-5)
    assert seen == [torch.Size([2, 5, 4])]


def test_saves_only_the_input_once_for_modules_sharing_it():
    """With dropout, q/k/v-style siblings save x once, no dropped copy and no mask."""
    torch.manual_seed(0)
    layers = [LoRALinear(nn.Linear(64, 64), r=4, scaling=2.0, dropout=0.1, init=False).train() for _ in range(3)]
    x = torch.randn(8, 64, requires_grad=True)
    big = {}

    def pack(t):
        if t.numel() >= x.numel():
            big[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        sum(layer(x).sum() for layer in layers).backward()
    params = {q.untyped_storage().data_ptr() for layer in layers for q in layer.parameters()}
    assert {ptr for ptr in big if ptr not in params} == {x.untyped_storage().data_ptr()}


def _model_grads(model, ids, *, on: bool, seed: int = 5):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    with fused.use_fused(on):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_whole_llama_matches_plain_path(input_ids):
    model = wrap(make_llama(), LoRAConfig(r=4, lora_dropout=0.0, init_lora_weights=False,
                                          target_modules="all-linear")).train()
    loss, grads = _model_grads(model, input_ids, on=True)
    loss_ref, grads_ref = _model_grads(model, input_ids, on=False)
    torch.testing.assert_close(loss, loss_ref, rtol=1e-5, atol=1e-5)
    assert grads.keys() == grads_ref.keys() and len(grads) > 0
    for name in grads:
        torch.testing.assert_close(grads[name], grads_ref[name], rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("reentrant", [False, True])
def test_gradient_checkpointing_replays_the_same_masks(input_ids, reentrant):
    config = LoRAConfig(r=4, lora_dropout=0.2, init_lora_weights=False)
    plain = wrap(make_llama(), config).train()
    ckpt = wrap(make_llama(), config).train()
    ckpt.load_state_dict(plain.state_dict())
    ckpt.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    loss, grads = _model_grads(plain, input_ids, on=True)
    loss_ckpt, grads_ckpt = _model_grads(ckpt, input_ids, on=True)
    torch.testing.assert_close(loss, loss_ckpt, rtol=0, atol=0)
    for name in grads:
        torch.testing.assert_close(grads[name], grads_ckpt[name], rtol=1e-5, atol=1e-6, msg=name)
    # A different seed gives different masks, so checkpointing did not just disable dropout.
    other, _ = _model_grads(plain, input_ids, on=True, seed=6)
    assert other != loss


@pytest.mark.parametrize("bits", [4, 8])
def test_bnb_base_matches_plain_path(tmp_path, input_ids, monkeypatch, bits):
    base = load_quantized(save_base(make_llama(), tmp_path / "base"), bits)
    model = wrap(base, LoRAConfig(r=4, lora_dropout=0.0, init_lora_weights=False)).train()
    calls = []
    monkeypatch.setattr(fused, "adapter_update", lambda *a: calls.append(1) or fused_update(*a))
    loss, grads = _model_grads(model, input_ids, on=True)
    assert calls, f"the fast path did not run on the {bits}-bit base"
    loss_ref, grads_ref = _model_grads(model, input_ids, on=False)
    torch.testing.assert_close(loss, loss_ref, rtol=1e-5, atol=1e-5)
    for name in grads:
        torch.testing.assert_close(grads[name], grads_ref[name], rtol=1e-4, atol=1e-5, msg=name)
