"""Base fingerprints: recorded on save, compared on load (warn by default, raise with strict_base)."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from conftest import load_quantized, make_llama, save_base

from hf_lora import LoRAConfig, LoRAModelWrapper, wrap
from hf_lora.fingerprint import FINGERPRINT_KEY, BaseMismatchWarning, base_fingerprint, compare_fingerprints
from hf_lora.layers import LoRALayer

CONFIG = LoRAConfig(r=4, lora_alpha=8, target_modules=["attention", "mlp"], init_lora_weights=False)


def _saved_adapter(tmp_path, base=None):
    model = wrap(base if base is not None else make_llama(seed=0), CONFIG)
    folder = tmp_path / "adapter"
    model.save_pretrained(str(folder))
    return model, folder


def _no_lora_layers(model) -> bool:
    return not any(isinstance(m, LoRALayer) for m in model.modules())


def test_fingerprint_recorded_in_adapter_config(tmp_path):
    _, folder = _saved_adapter(tmp_path)
    data = json.loads((folder / "adapter_config.json").read_text())
    entry = data[FINGERPRINT_KEY]
    assert entry["format"] == 1
    assert entry["num_layers"] == 14  # 2 layers x (q, k, v, o, gate, up, down)
    assert entry["shapes"] == {
        "q_proj": [[64, 64]], "k_proj": [[32, 64]], "v_proj": [[32, 64]], "o_proj": [[64, 64]],
        "gate_proj": [[128, 64]], "up_proj": [[128, 64]], "down_proj": [[64, 128]],
    }
    assert len(entry["sampled"]) == 4
    for sample in entry["sampled"].values():
        assert sample["storage"] == "float32"
        assert len(sample["sha256"]) == 16
        assert sample["signs"].startswith("256:")


def test_same_base_loads_silently(tmp_path, input_ids):
    model, folder = _saved_adapter(tmp_path)
    expected = model(input_ids).logits
    with warnings.catch_warnings():
        warnings.simplefilter("error", BaseMismatchWarning)
        loaded = LoRAModelWrapper.from_pretrained(make_llama(seed=0), str(folder), strict_base=True)
    torch.testing.assert_close(loaded(input_ids).logits, expected)


def test_different_base_warns_naming_the_difference(tmp_path):
    _, folder = _saved_adapter(tmp_path)
    with pytest.warns(BaseMismatchWarning, match=r"weights differ in sampled layers \[.*'model\.layers\.0\.self_attn\.q_proj'"):
        loaded = LoRAModelWrapper.from_pretrained(make_llama(seed=1), str(folder))
    assert isinstance(loaded, LoRAModelWrapper)  # loading still happens by default


def test_strict_base_raises_and_leaves_base_untouched(tmp_path):
    _, folder = _saved_adapter(tmp_path)
    other = make_llama(seed=1)
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(ValueError, match="saved with a different base model: weights differ"):
        LoRAModelWrapper.from_pretrained(other, str(folder), strict_base=True)
    assert _no_lora_layers(other)
    after = other.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_shape_difference_is_named(tmp_path):
    _, folder = _saved_adapter(tmp_path)
    with pytest.raises(ValueError, match=r"gate_proj weight shapes \[\[128, 64\]\] \(saved\) vs \[\[96, 64\]\]"):
        LoRAModelWrapper.from_pretrained(make_llama(seed=0, intermediate_size=96), str(folder), strict_base=True)


def test_name_reported_only_with_a_content_difference(tmp_path):
    base = make_llama(seed=0)
    base.config._name_or_path = "org/base-a"
    _, folder = _saved_adapter(tmp_path, base)
    renamed = make_llama(seed=0)
    renamed.config._name_or_path = "/local/copy"
    with warnings.catch_warnings():
        warnings.simplefilter("error", BaseMismatchWarning)
        LoRAModelWrapper.from_pretrained(renamed, str(folder))  # same weights, other location: fine
    other = make_llama(seed=2)
    other.config._name_or_path = "org/base-b"
    with pytest.raises(ValueError, match="base_model_name_or_path 'org/base-a' \\(saved\\) vs 'org/base-b'"):
        LoRAModelWrapper.from_pretrained(other, str(folder), strict_base=True)


def test_adapter_without_fingerprint_is_not_checked(tmp_path):
    _, folder = _saved_adapter(tmp_path)
    path = folder / "adapter_config.json"
    data = json.loads(path.read_text())
    del data[FINGERPRINT_KEY]
    path.write_text(json.dumps(data))
    with warnings.catch_warnings():
        warnings.simplefilter("error", BaseMismatchWarning)
        LoRAModelWrapper.from_pretrained(make_llama(seed=1), str(folder), strict_base=True)


def test_merged_model_fingerprints_its_base():
    model = wrap(make_llama(seed=0), CONFIG)
    unmerged = base_fingerprint(model)
    model.merge()
    merged = base_fingerprint(model)
    assert compare_fingerprints(unmerged, merged) == []
    assert all(entry["sha256"] is None for entry in merged["sampled"].values())


def test_peft_loads_folder_with_the_extra_key(tmp_path, input_ids):
    peft = pytest.importorskip("peft")
    model, folder = _saved_adapter(tmp_path)
    # PEFT drops keys it does not know, with a warning that names them.
    with pytest.warns(UserWarning, match=FINGERPRINT_KEY):
        config = peft.LoraConfig.from_pretrained(str(folder))
    assert config.r == 4 and not hasattr(config, FINGERPRINT_KEY)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = peft.PeftModel.from_pretrained(make_llama(seed=0), str(folder))
    torch.testing.assert_close(peft_model(input_ids).logits, model(input_ids).logits)


@pytest.fixture(scope="module")
def quantized_bases(tmp_path_factory):
    pytest.importorskip("bitsandbytes")
    root = tmp_path_factory.mktemp("bases")
    same = save_base(make_llama(seed=0), root / "seed0")
    other = save_base(make_llama(seed=1), root / "seed1")
    return same, other


def test_quantized_base_hashes_quantized_bytes(tmp_path, quantized_bases):
    same, other = quantized_bases
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # bitsandbytes CPU notices
        _, folder = _saved_adapter(tmp_path, load_quantized(same, 4))
    entry = json.loads((folder / "adapter_config.json").read_text())[FINGERPRINT_KEY]
    assert {s["storage"] for s in entry["sampled"].values()} == {"bnb-4bit-nf4"}
    assert entry["shapes"]["gate_proj"] == [[128, 64]]  # logical shape, not the packed one
    with warnings.catch_warnings():
        warnings.simplefilter("error", BaseMismatchWarning)
        LoRAModelWrapper.from_pretrained(load_quantized(same, 4), str(folder), strict_base=True)
        # A QLoRA adapter on the full-precision base it was quantized from: signs agree.
        LoRAModelWrapper.from_pretrained(make_llama(seed=0), str(folder), strict_base=True)
        LoRAModelWrapper.from_pretrained(load_quantized(same, 8), str(folder), strict_base=True)
    with pytest.raises(ValueError, match="weights differ in sampled layers"):
        LoRAModelWrapper.from_pretrained(load_quantized(other, 4), str(folder), strict_base=True)
    with pytest.raises(ValueError, match="weights differ in sampled layers"):
        LoRAModelWrapper.from_pretrained(make_llama(seed=1), str(folder), strict_base=True)


def test_depth_difference_is_named_and_other_targets_are_not_a_difference(tmp_path):
    _, folder = _saved_adapter(tmp_path)
    with pytest.raises(ValueError, match=r"14 adapted layers \(saved\) vs 21 \(this base\)"):
        LoRAModelWrapper.from_pretrained(make_llama(seed=0, num_hidden_layers=3), str(folder), strict_base=True)
    saved = json.loads((folder / "adapter_config.json").read_text())[FINGERPRINT_KEY]
    attention_only = base_fingerprint(wrap(make_llama(seed=0), LoRAConfig(r=2, target_modules=["attention"])))
    assert compare_fingerprints(saved, attention_only) == []
