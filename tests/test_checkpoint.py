"""Adapter files: exact saved keys, round trips, and loading errors that leave the base untouched."""

from __future__ import annotations

import json
import pathlib
import re

import pytest
import torch
from conftest import make_bert, make_gpt2, make_llama
from safetensors.torch import load_file, save_file
from test_wrap import _snapshot, assert_unchanged

from hf_lora import LoRAConfig, LoRAModelWrapper, wrap
from hf_lora.state import lora_layers

LLAMA_KEYS = {
    f"base_model.model.model.layers.{i}.{mod}.lora_{ab}.weight"
    for i in (0, 1)
    for mod in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
    for ab in "AB"
}


@torch.no_grad()
def _logits(model, ids):
    return model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits


def _saved(tmp_path, make, **cfg) -> tuple[pathlib.Path, torch.nn.Module]:
    wrapper = wrap(make(), LoRAConfig(init_lora_weights=False, **cfg))
    folder = tmp_path / "adapter"
    wrapper.save_pretrained(str(folder))
    return folder, wrapper


def test_saved_files_and_exact_key_set_for_tiny_llama(tmp_path):
    folder, wrapper = _saved(tmp_path, make_llama)
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    tensors = load_file(folder / "adapter_model.safetensors")
    assert set(tensors) == LLAMA_KEYS and len(LLAMA_KEYS) == 28
    assert tensors["base_model.model.model.layers.0.self_attn.k_proj.lora_A.weight"].shape == (8, 64)
    assert tensors["base_model.model.model.layers.0.self_attn.k_proj.lora_B.weight"].shape == (32, 8)
    assert all(t.dtype == torch.float32 for t in tensors.values())
    q = wrapper.base_model.model.layers[1].self_attn.q_proj
    assert torch.equal(tensors["base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight"], q.lora_B.weight)
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM"
    assert config["target_modules"] == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
    assert (config["r"], config["lora_alpha"], config["fan_in_fan_out"]) == (8, 16, False)
    card = (folder / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: peft") and "| r | 8 |" in card


def test_embedding_base_weight_is_never_written(tmp_path):
    folder, _ = _saved(tmp_path, make_llama, target_modules=["embedding"])
    tensors = load_file(folder / "adapter_model.safetensors")
    assert set(tensors) == {"base_model.model.model.embed_tokens.lora_embedding_A",
                            "base_model.model.model.embed_tokens.lora_embedding_B"}
    # 8 x 256 + 64 x 8 floats plus a small header: no room for the 256 x 64 base table
    assert (folder / "adapter_model.safetensors").stat().st_size < 4 * (8 * 256 + 64 * 8) + 1024


def test_gpt2_config_records_fan_in_fan_out(tmp_path):
    folder, _ = _saved(tmp_path, make_gpt2, target_modules=["attention", "embedding"])
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["fan_in_fan_out"] is True
    # leaf names would also select mlp.c_proj, so the exact paths are written as one regex
    paths = [p for p, _ in make_gpt2().named_modules() if p]
    assert [p for p in paths if re.fullmatch(config["target_modules"], p)] == [
        "transformer.wte", "transformer.h.0.attn.c_attn", "transformer.h.0.attn.c_proj",
        "transformer.h.1.attn.c_attn", "transformer.h.1.attn.c_proj"]
    keys = set(load_file(folder / "adapter_model.safetensors"))
    assert "base_model.model.transformer.wte.lora_embedding_A" in keys
    assert not any(k.endswith("wte.weight") or "base_layer" in k for k in keys)


def test_bert_keys_with_bias_and_modules_to_save(tmp_path):
    folder, _ = _saved(tmp_path, make_bert, target_modules=["query"], bias="lora_only",
                       modules_to_save=["classifier"])
    keys = set(load_file(folder / "adapter_model.safetensors"))
    expected = {f"base_model.model.bert.encoder.layer.{i}.attention.self.query.{t}" for i in (0, 1)
                for t in ("lora_A.weight", "lora_B.weight", "base_layer.bias")}
    assert keys == expected | {"base_model.model.classifier.weight", "base_model.model.classifier.bias"}


ROUND_TRIPS = {
    "llama-linear+embedding": (make_llama, {"target_modules": ["attention", "mlp", "embedding"]}),
    "llama-patterns": (make_llama, {"target_modules": ["attention"], "rank_pattern": {"v_proj": 2},
                                    "alpha_pattern": {"o_proj": 3}, "use_rslora": True}),
    "gpt2-conv1d+wte": (make_gpt2, {"target_modules": ["attention", "mlp", "embedding"]}),
    "bert-all": (make_bert, {"target_modules": ["attention"], "bias": "all", "modules_to_save": ["classifier"]}),
    "bert-lora-only": (make_bert, {"target_modules": ["query"], "bias": "lora_only", "modules_to_save": ["classifier"]}),
}


@pytest.mark.parametrize("name", ROUND_TRIPS)
def test_save_load_round_trip_gives_identical_logits(tmp_path, input_ids, name):
    make, cfg = ROUND_TRIPS[name]
    folder, wrapper = _saved(tmp_path, make, **cfg)
    with torch.no_grad():  # train biases / the saved head too, so they must travel
        for param in wrapper.adapter_parameters().values():
            param.add_(0.01)
    wrapper.save_pretrained(str(folder))
    expected = _logits(wrapper, input_ids)
    assert not torch.equal(expected, _logits(make(), input_ids))
    loaded = LoRAModelWrapper.from_pretrained(make(), str(folder))
    assert torch.equal(_logits(loaded, input_ids), expected)
    assert loaded.adapter_parameters().keys() == wrapper.adapter_parameters().keys()
    for (path, a), (_, b) in zip(lora_layers(loaded.base_model), lora_layers(wrapper.base_model)):
        assert (a.r, a.scaling) == (b.r, b.scaling), path


def test_from_pretrained_is_frozen_by_default_and_trainable_on_request(tmp_path):
    folder, _ = _saved(tmp_path, make_llama)
    inference = LoRAModelWrapper.from_pretrained(make_llama().train(), str(folder))
    assert not any(p.requires_grad for p in inference.parameters())
    assert not inference.training
    trainable = LoRAModelWrapper.from_pretrained(make_llama(), str(folder), is_trainable=True)
    assert {n for n, p in trainable.named_parameters() if p.requires_grad} == {
        k.replace("base_model.model.", "base_model.", 1) for k in LLAMA_KEYS}


# --- errors: each names the file, and the base model stays exactly as it was ---------------


def _assert_load_fails(folder, pattern, make=make_llama):
    base = make()
    snapshot = _snapshot(base)
    with pytest.raises(ValueError, match=pattern):
        LoRAModelWrapper.from_pretrained(base, str(folder))
    assert_unchanged(base, snapshot)


def test_shape_mismatch_names_first_bad_key_and_both_shapes_and_loads_nothing(tmp_path):
    folder, _ = _saved(tmp_path, make_llama)
    path = folder / "adapter_model.safetensors"
    tensors = load_file(path)
    tensors["base_model.model.model.layers.1.mlp.up_proj.lora_A.weight"] = torch.zeros(8, 65)
    tensors["base_model.model.model.layers.0.self_attn.v_proj.lora_B.weight"] = torch.zeros(31, 8)
    save_file(tensors, path)
    _assert_load_fails(
        folder, r"tensor 'base_model\.model\.model\.layers\.0\.self_attn\.v_proj\.lora_B\.weight' has shape "
                r"\(31, 8\) but the model expects \(32, 8\)")


def test_rank_mismatch_between_config_and_weights_is_a_shape_error(tmp_path):
    folder, _ = _saved(tmp_path, make_llama)
    config = json.loads((folder / "adapter_config.json").read_text())
    config["r"] = 4
    (folder / "adapter_config.json").write_text(json.dumps(config))
    path = folder / "adapter_model.safetensors"
    save_file(load_file(path), path)  # as PEFT writes it: no record of which config it was saved with
    _assert_load_fails(folder, r"layers\.0\.self_attn\.q_proj\.lora_A\.weight' has shape \(8, 64\) but the model "
                               r"expects \(4, 64\)")


def test_integer_adapter_tensor_is_refused(tmp_path):
    folder, _ = _saved(tmp_path, make_llama)
    path = folder / "adapter_model.safetensors"
    tensors = load_file(path)
    key = "base_model.model.model.layers.1.self_attn.o_proj.lora_A.weight"
    tensors[key] = tensors[key].to(torch.int32)
    save_file(tensors, path)
    _assert_load_fails(folder, rf"tensor '{re.escape(key)}' has dtype torch\.int32; expected a floating point dtype")


def test_missing_and_unexpected_keys_are_named(tmp_path):
    folder, _ = _saved(tmp_path, make_llama)
    path = folder / "adapter_model.safetensors"
    tensors = load_file(path)
    del tensors["base_model.model.model.layers.0.mlp.down_proj.lora_B.weight"]
    tensors["base_model.model.model.layers.0.mlp.foo.lora_A.weight"] = torch.zeros(2, 2)
    save_file(tensors, path)
    _assert_load_fails(folder, r"adapter keys do not match the model: missing \['base_model\.model\.model\.layers\.0"
                               r"\.mlp\.down_proj\.lora_B\.weight'\], unexpected \['.*mlp\.foo\.lora_A\.weight'\]")


def test_missing_adapter_config_names_the_file(tmp_path):
    folder, _ = _saved(tmp_path, make_llama)
    (folder / "adapter_config.json").unlink()
    _assert_load_fails(folder, r"adapter_config\.json: missing")


def test_invalid_json_names_the_file(tmp_path):
    folder, _ = _saved(tmp_path, make_llama)
    (folder / "adapter_config.json").write_text("{not json")
    _assert_load_fails(folder, r"adapter_config\.json: not valid UTF-8 JSON")


def test_unknown_peft_type_names_the_file(tmp_path):
    folder, _ = _saved(tmp_path, make_llama)
    config = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**config, "peft_type": "PREFIX_TUNING"}))
    _assert_load_fails(folder, r"adapter_config\.json: peft_type='PREFIX_TUNING' is not supported")


def test_missing_weights_name_the_file(tmp_path):
    folder, _ = _saved(tmp_path, make_llama)
    (folder / "adapter_model.safetensors").unlink()
    _assert_load_fails(folder, r"adapter_model\.safetensors: missing")


@pytest.mark.parametrize("keep", [0.5, 0.0, 8 / 1e9], ids=["half", "empty", "header-only"])
def test_truncated_weights_name_the_file(tmp_path, keep):
    folder, _ = _saved(tmp_path, make_llama)
    path = folder / "adapter_model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: max(int(len(data) * keep), 8 if keep else 0)])
    _assert_load_fails(folder, r"adapter_model\.safetensors: unreadable or truncated safetensors file")


def test_missing_folder_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match=r"Adapter folder '.*nowhere' does not exist"):
        LoRAModelWrapper.from_pretrained(make_llama(), str(tmp_path / "nowhere"))


def test_unreachable_hub_id_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # conftest sets it too; nothing may go to the network
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    base = make_llama()
    snapshot = _snapshot(base)
    with pytest.raises(ValueError, match=r"Adapter 'no-such-org/no-such-adapter' is not a local folder and could "
                                         r"not be fetched from the Hub"):
        LoRAModelWrapper.from_pretrained(base, "no-such-org/no-such-adapter")
    assert_unchanged(base, snapshot)


def test_save_into_a_file_path_is_refused(tmp_path):
    target = tmp_path / "file"
    target.write_text("x")
    with pytest.raises(ValueError, match="exists and is not a folder"):
        wrap(make_llama()).save_pretrained(str(target))


# --- legacy .bin -------------------------------------------------------------------------------


def _to_legacy(folder: pathlib.Path, payload) -> None:
    (folder / "adapter_model.safetensors").unlink()
    torch.save(payload, folder / "adapter_model.bin")


def test_legacy_bin_of_tensors_loads(tmp_path, input_ids):
    folder, wrapper = _saved(tmp_path, make_llama)
    _to_legacy(folder, load_file(folder / "adapter_model.safetensors"))
    loaded = LoRAModelWrapper.from_pretrained(make_llama(), str(folder))
    assert torch.equal(_logits(loaded, input_ids), _logits(wrapper, input_ids))


class _Payload:
    """Unpickling this would run ``pathlib.Path.touch``: a stand-in for arbitrary code."""

    def __init__(self, sentinel: pathlib.Path) -> None:
        self.sentinel = sentinel

    def __reduce__(self):
        return (pathlib.Path.touch, (self.sentinel,))


def test_legacy_bin_is_never_unpickled(tmp_path):
    folder, _ = _saved(tmp_path, make_llama)
    sentinel = tmp_path / "code-ran"
    tensors = load_file(folder / "adapter_model.safetensors")
    _to_legacy(folder, {**tensors, "extra": _Payload(sentinel)})
    _assert_load_fails(folder, r"adapter_model\.bin: cannot be read safely")
    assert not sentinel.exists()


def test_legacy_bin_with_non_tensor_values_is_rejected(tmp_path):
    folder, _ = _saved(tmp_path, make_llama)
    _to_legacy(folder, {**load_file(folder / "adapter_model.safetensors"), "step": 3})
    _assert_load_fails(folder, r"adapter_model\.bin: expected a dict of tensors")
