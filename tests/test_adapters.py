"""Many adapters on one base: in-place switching, padding, saving in PEFT's layout, combining."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from conftest import make_gpt2, make_llama
from safetensors import safe_open

from hf_lora import LoRAConfig, LoRAModelWrapper, wrap
from hf_lora.state import lora_layers

TARGETS = ["attention", "mlp"]


def _save(folder, seed: int, r: int, alpha: float, **overrides) -> str:
    base = make_llama(seed=0)
    torch.manual_seed(seed)
    config = LoRAConfig(r=r, lora_alpha=alpha, target_modules=overrides.pop("target_modules", TARGETS),
                        init_lora_weights=False, **overrides)
    wrap(base, config).save_pretrained(str(folder))
    return str(folder)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    return {"a": _save(root / "a", seed=1, r=4, alpha=8), "b": _save(root / "b", seed=2, r=8, alpha=4)}


@pytest.fixture(scope="module")
def refs(folders):
    """Logits and deltas of each adapter loaded alone (the references switching must reproduce)."""
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(1))  # same as conftest's input_ids
    models = {k: _alone(v) for k, v in folders.items()}
    return {k: (_logits(m, ids), _deltas(m)) for k, m in models.items()}


def _alone(folder: str):
    return LoRAModelWrapper.from_pretrained(make_llama(seed=0), folder)


def _logits(model, input_ids):
    with torch.no_grad():
        return model(input_ids).logits


def _deltas(model) -> dict[str, torch.Tensor]:
    return {path: layer.delta_weight().double() for path, layer in lora_layers(model.base_model)}


def _weights(folder) -> dict[str, tuple[int, ...]]:
    with safe_open(f"{folder}/adapter_model.safetensors", framework="pt") as handle:
        return {k: tuple(handle.get_slice(k).get_shape()) for k in handle.keys()}  # noqa: SIM118 (safe_open is not iterable)


def test_switching_gives_each_adapters_own_logits_in_place(folders, refs, input_ids):
    ref_a, ref_b = refs["a"][0], refs["b"][0]
    assert not torch.allclose(ref_a, ref_b)
    model = _alone(folders["a"])
    modules = [id(m) for m in model.modules()]
    params = [id(p) for p in model.parameters()]
    keys = set(model.state_dict())
    model.load_adapter(folders["b"], "b")
    assert model.active_adapter == "default"
    torch.testing.assert_close(_logits(model, input_ids), ref_a)  # loading (and padding to r=8) changes nothing
    model.set_adapter("b")
    torch.testing.assert_close(_logits(model, input_ids), ref_b)
    model.set_adapter("default")
    torch.testing.assert_close(_logits(model, input_ids), ref_a)
    with model.use_adapter("b"):
        assert model.active_adapter == "b"
        torch.testing.assert_close(_logits(model, input_ids), ref_b)
    assert model.active_adapter == "default"
    assert [id(m) for m in model.modules()] == modules and [id(p) for p in model.parameters()] == params
    assert set(model.state_dict()) == keys  # stored adapters live outside the module tree
    assert list(model.adapters) == ["default", "b"] and model.adapters["b"].r == 8
    assert model.base_model.model.layers[0].self_attn.q_proj.lora_A.weight.shape == (8, 64)


def test_save_uses_peft_layout_and_trims_padding(folders, refs, tmp_path, input_ids):
    model = _alone(folders["a"])
    model.load_adapter(folders["b"], "b")
    model.save_pretrained(str(tmp_path / "out"))
    assert _weights(tmp_path / "out")["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"] == (4, 64)
    assert _weights(tmp_path / "out" / "b")["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"] == (64, 8)
    assert json.loads((tmp_path / "out" / "b" / "adapter_config.json").read_text())["r"] == 8
    torch.testing.assert_close(_logits(_alone(str(tmp_path / "out" / "b")), input_ids), refs["b"][0])
    assert model.active_adapter == "default"
    peft = pytest.importorskip("peft")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = peft.PeftModel.from_pretrained(make_llama(seed=0), str(tmp_path / "out"))
        peft_model.load_adapter(str(tmp_path / "out"), adapter_name="b", subfolder="b")
    peft_model.set_adapter("b")
    torch.testing.assert_close(_logits(peft_model, input_ids), refs["b"][0])


def test_training_keeps_padding_zero_and_survives_switching(folders, refs, tmp_path, input_ids):
    model = LoRAModelWrapper.from_pretrained(make_llama(seed=0), folders["a"], is_trainable=True)
    model.load_adapter(folders["b"], "b")  # pads every layer to rank 8
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model(input_ids, labels=input_ids).loss.backward()
    optimizer.step()
    q_proj = model.base_model.model.layers[0].self_attn.q_proj
    assert torch.count_nonzero(q_proj.lora_A.weight[4:]) == 0 and torch.count_nonzero(q_proj.lora_B.weight[:, 4:]) == 0
    trained = _logits(model, input_ids)
    assert not torch.allclose(trained, refs["a"][0])
    with model.use_adapter("b"):
        torch.testing.assert_close(_logits(model, input_ids), refs["b"][0])
    torch.testing.assert_close(_logits(model, input_ids), trained)  # trained values came back
    model.save_pretrained(str(tmp_path / "trained"))
    torch.testing.assert_close(_logits(_alone(str(tmp_path / "trained")), input_ids), trained)


def test_merged_model_stays_merged_across_switches(folders, refs, input_ids):
    model = _alone(folders["a"])
    model.load_adapter(folders["b"], "b")
    model.merge()
    model.set_adapter("b")
    assert all(layer.merged for _, layer in lora_layers(model.base_model))
    torch.testing.assert_close(_logits(model, input_ids), refs["b"][0], rtol=1e-4, atol=1e-5)


def test_delete_and_name_errors(folders):
    model = _alone(folders["a"])
    for bad, reason in [("../x", "path separators"), ("a/b", "path separators"), ("", "non-empty"), ("..", "'..'"),
                        ("adapter_config.json", "name of an adapter file")]:
        with pytest.raises(ValueError, match=reason):
            model.load_adapter(folders["b"], bad)
    with pytest.raises(ValueError, match="'default' is already loaded"):
        model.load_adapter(folders["b"], "default")
    model.load_adapter(folders["b"], "b")
    with pytest.raises(ValueError, match=r"Cannot delete the active adapter 'default': set_adapter\('b'\) first"):
        model.delete_adapter("default")
    model.delete_adapter("b")
    assert list(model.adapters) == ["default"]
    with pytest.raises(ValueError, match=r"No adapter named 'b'; loaded adapters: \['default'\]"):
        model.set_adapter("b")


def test_incompatible_adapters_are_refused(folders, tmp_path):
    model = _alone(folders["a"])
    attention_only = _save(tmp_path / "attn", seed=3, r=4, alpha=8, target_modules=["attention"])
    with pytest.raises(ValueError, match="does not cover the same layers as the loaded ones: missing"):
        model.load_adapter(attention_only, "attn")
    with_bias = _save(tmp_path / "bias", seed=3, r=4, alpha=8, bias="all")
    with pytest.raises(ValueError, match="bias='all' differs from the loaded adapters' 'none'"):
        model.load_adapter(with_bias, "bias")
    assert list(model.adapters) == ["default"]


def _dense_reference(refs, weights) -> dict[str, torch.Tensor]:
    deltas = [refs[k][1] for k in ("a", "b")]
    return {path: sum(w * d[path] for w, d in zip(weights, deltas)) for path in deltas[0]}


@pytest.mark.parametrize("method, rank", [("cat", None), ("svd", 12), ("svd", None), ("svd", 3)])
def test_add_weighted_adapter_against_dense_reference(folders, refs, tmp_path, method, rank, input_ids):
    weights = [0.7, -0.3]
    reference = _dense_reference(refs, weights)
    model = _alone(folders["a"])
    model.load_adapter(folders["b"], "b")
    model.add_weighted_adapter(["default", "b"], weights, "mix", method=method, rank=rank)
    expected_rank = {"cat": 12, "svd": rank or 8}[method]
    assert model.adapters["mix"].r == expected_rank
    model.set_adapter("mix")
    for path, delta in _deltas(model).items():
        target = reference[path]
        if method == "svd" and expected_rank < 12:  # best rank-k approximation of the dense sum
            u, s, vh = torch.linalg.svd(target)
            target = (u[:, :expected_rank] * s[:expected_rank]) @ vh[:expected_rank]
        torch.testing.assert_close(delta, target, rtol=1e-4, atol=1e-6)
    model.save_pretrained(str(tmp_path / "out"))
    torch.testing.assert_close(_logits(_alone(str(tmp_path / "out" / "mix")), input_ids), _logits(model, input_ids),
                               rtol=1e-4, atol=1e-5)


def test_add_weighted_adapter_argument_errors(folders):
    model = _alone(folders["a"])
    model.load_adapter(folders["b"], "b")
    with pytest.raises(ValueError, match=r"weights=\[1.0\] is invalid: expected one number per adapter \(2\)"):
        model.add_weighted_adapter(["default", "b"], [1.0], "mix")
    with pytest.raises(ValueError, match="method='sum' is invalid: expected 'cat' or 'svd'"):
        model.add_weighted_adapter(["default", "b"], [1.0, 1.0], "mix", method="sum")
    with pytest.raises(ValueError, match="rank=4 is invalid: .* only with method='svd'"):
        model.add_weighted_adapter(["default", "b"], [1.0, 1.0], "mix", method="cat", rank=4)
    with pytest.raises(ValueError, match="No adapter named 'c'"):
        model.add_weighted_adapter(["default", "c"], [1.0, 1.0], "mix")
    with pytest.raises(ValueError, match="expected finite numbers"):
        model.add_weighted_adapter(["default", "b"], [1.0, float("nan")], "mix")


def test_switching_under_torch_compile_does_not_recompile(folders, tmp_path, refs, input_ids):
    # Same shapes (after padding) and same scaling: dynamo's guards still hold after a switch.
    # (An adapter with another scaling costs one recompile the first time it runs: the scaling
    # is a Python float the graph specialises on.)
    from torch._dynamo.utils import counters

    same_scaling = _save(tmp_path / "c", seed=3, r=8, alpha=4)  # 4 / 8, like "b"
    model = _alone(folders["b"])
    model.load_adapter(same_scaling, "c")
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(model, backend="eager")
    with torch.no_grad():
        first = compiled(input_ids).logits
        model.set_adapter("c")
        switched = compiled(input_ids).logits
        torch.testing.assert_close(switched, model(input_ids).logits)
        model.set_adapter("default")
        torch.testing.assert_close(compiled(input_ids).logits, first)
    torch.testing.assert_close(first, refs["b"][0])
    assert not torch.allclose(first, switched)
    assert counters["stats"]["unique_graphs"] == 1
    torch._dynamo.reset()


_KIND_CONFIGS = {
    "gpt2-conv1d-embedding": {"target_modules": ["attention", "mlp", "embedding"]},
    "llama-dora": {"use_dora": True},
    "llama-token-rows": {"trainable_token_indices": (3, 5, 7)},
}


@pytest.mark.parametrize("kind", list(_KIND_CONFIGS))
def test_switching_other_layer_kinds(kind, tmp_path, input_ids):
    make = make_gpt2 if kind.startswith("gpt2") else make_llama
    extra = _KIND_CONFIGS[kind]
    input_ids = input_ids.clone()
    input_ids[:, :3] = torch.tensor([3, 5, 7])  # the token rows take part
    refs, tokens = {}, {}
    for name, seed, r in [("a", 1, 4), ("b", 2, 8)]:
        base = make(0)
        torch.manual_seed(seed)
        model = wrap(base, LoRAConfig(r=r, lora_alpha=2 * r, init_lora_weights=False, **extra))
        with torch.no_grad():  # embedding A starts at zero even with init_lora_weights=False
            for param in model.adapter_parameters().values():
                param.add_(0.05 * torch.randn_like(param))
        model.save_pretrained(str(tmp_path / name))
        alone = LoRAModelWrapper.from_pretrained(make(0), str(tmp_path / name))
        refs[name] = _logits(alone, input_ids)
        tokens[name] = {k: v.detach().clone() for k, v in alone.adapter_parameters().items() if "token" in k}
    model = LoRAModelWrapper.from_pretrained(make(0), str(tmp_path / "a"))
    model.load_adapter(str(tmp_path / "b"), "b")
    for name, ref, key in [("b", refs["b"], "b"), ("default", refs["a"], "a")]:
        model.set_adapter(name)
        torch.testing.assert_close(_logits(model, input_ids), ref)
        live = {k: v for k, v in model.adapter_parameters().items() if "token" in k}
        assert live.keys() == tokens[key].keys() and (kind != "llama-token-rows" or live)
        for k, v in live.items():
            assert torch.equal(v, tokens[key][k]), k
    assert not torch.allclose(refs["a"], refs["b"])
