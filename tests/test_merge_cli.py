"""`hf-lora merge` and `hf-lora push`: standalone merged folders, 4-bit bases, shards, errors, uploads."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import load_quantized, make_llama, save_base
from safetensors import safe_open

from hf_lora import LoRAConfig, LoRAModelWrapper, wrap
from hf_lora.cli import main as cli

IDS = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(3))


def _trained_adapter(tmp_path: Path, base_model=None, **config) -> tuple[str, str, LoRAModelWrapper]:
    """Save a base and an adapter with random (non-zero) factors, as training would leave them."""
    base = save_base(base_model if base_model is not None else make_llama(), tmp_path / "base")
    torch.manual_seed(5)
    wrapper = wrap(make_llama(), LoRAConfig(r=4, lora_alpha=8, init_lora_weights=False, **config)).eval()
    adapter = str(tmp_path / "adapter")
    wrapper.save_pretrained(adapter)
    return base, adapter, wrapper


def _logits(model, ids=IDS) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def _keys(folder: Path) -> set[str]:
    keys: set[str] = set()
    for shard in folder.glob("*.safetensors"):
        with safe_open(str(shard), framework="pt") as handle:
            keys |= set(handle.keys())
    return keys


def test_merged_folder_loads_without_hf_lora_and_matches_wrapped_logits(tmp_path):
    base, adapter, wrapper = _trained_adapter(tmp_path)
    out = tmp_path / "merged"
    assert cli(["merge", base, adapter, str(out)]) == 0
    assert _keys(out) == _keys(Path(base))  # same tensors, same names: no LoRA keys left
    expected = _logits(wrapper)
    torch.save(IDS, tmp_path / "ids.pt")
    script = (
        "import sys, torch\n"
        "from transformers import AutoModelForCausalLM\n"
        f"m = AutoModelForCausalLM.from_pretrained({str(out)!r}).eval()\n"
        f"ids = torch.load({str(tmp_path / 'ids.pt')!r})\n"
        "assert not any(n.startswith('hf_lora') for n in sys.modules), 'hf_lora was imported'\n"
        f"torch.save(m(input_ids=ids).logits.detach(), {str(tmp_path / 'logits.pt')!r})\n"
    )
    subprocess.run([sys.executable, "-c", script], check=True, capture_output=True, cwd=tmp_path, timeout=120)
    got = torch.load(tmp_path / "logits.pt")
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    base_logits = _logits(make_llama())
    assert (got - base_logits).abs().max() > 1e-2  # the adapter really changed the model


def test_unadapted_tensors_are_copied_bit_for_bit_and_adapted_ones_equal_library_merge(tmp_path):
    base, adapter, wrapper = _trained_adapter(tmp_path, target_modules=["attention"])
    out = tmp_path / "merged"
    assert cli(["merge", base, adapter, str(out)]) == 0
    wrapper.merge()
    merged_in_memory = {k: v for k, v in wrapper.base_model.state_dict().items()}
    with safe_open(str(out / "model.safetensors"), framework="pt") as got, \
            safe_open(str(Path(base) / "model.safetensors"), framework="pt") as original:
        for key in got.keys():
            tensor = got.get_tensor(key)
            if ".self_attn." in key and key.endswith("_proj.weight"):
                lib_key = key.replace(".weight", ".base_layer.weight")
                torch.testing.assert_close(tensor, merged_in_memory[lib_key], rtol=0, atol=0)
                assert not torch.equal(tensor, original.get_tensor(key))
            else:
                assert torch.equal(tensor, original.get_tensor(key)), key


def test_sharded_base_gives_sharded_output_with_index(tmp_path):
    model = make_llama()
    base = str(tmp_path / "base")
    model.save_pretrained(base, max_shard_size="100KB")
    assert len(list(Path(base).glob("*.safetensors"))) > 1
    _, adapter, wrapper = _trained_adapter(tmp_path / "a", base_model=make_llama())
    out = tmp_path / "merged"
    assert cli(["merge", base, adapter, str(out)]) == 0
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert sorted(set(index["weight_map"].values())) == sorted(p.name for p in Path(base).glob("*.safetensors"))
    from transformers import AutoModelForCausalLM

    torch.testing.assert_close(_logits(AutoModelForCausalLM.from_pretrained(str(out))), _logits(wrapper),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("config", [
    {"use_dora": True, "target_modules": ["attention", "mlp"]},
    {"bias": "all", "modules_to_save": ["lm_head"]},
    {"target_modules": ["attention"], "trainable_token_indices": [3, 7]},
    {"target_modules": ["attention", "embedding"]},
], ids=["dora", "bias_all+modules_to_save", "tokens", "embedding"])
def test_variants_merge_to_the_wrapped_logits(tmp_path, config):
    base, adapter, _ = _trained_adapter(tmp_path, **config)
    with torch.no_grad():  # make the trained parts non-trivial where init leaves them equal to the base
        loaded = LoRAModelWrapper.from_pretrained(make_llama(), adapter, is_trainable=True)
        for p in loaded.adapter_parameters().values():
            p.add_(torch.randn_like(p) * 0.05)
        loaded.save_pretrained(adapter)
    out = tmp_path / "merged"
    assert cli(["merge", base, adapter, str(out)]) == 0
    from transformers import AutoModelForCausalLM

    expected = _logits(LoRAModelWrapper.from_pretrained(make_llama(), adapter))
    torch.testing.assert_close(_logits(AutoModelForCausalLM.from_pretrained(str(out))), expected, rtol=1e-4, atol=1e-4)


def test_4bit_base_is_merged_into_a_dense_copy(tmp_path):
    dense = save_base(make_llama(), tmp_path / "dense")
    quantized = load_quantized(dense, 4)
    quantized.save_pretrained(str(tmp_path / "base4"))
    _, adapter, _ = _trained_adapter(tmp_path / "a")
    wrapped4 = LoRAModelWrapper.from_pretrained(load_quantized(str(tmp_path / "base4"), 4), adapter)
    out = tmp_path / "merged"
    assert cli(["merge", str(tmp_path / "base4"), adapter, str(out), "--safe"]) == 0
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config
    with safe_open(str(out / "model.safetensors"), framework="pt") as handle:
        assert not any(k.endswith(("absmax", "quant_map")) or "quant_state" in k for k in handle.keys())
        assert handle.get_tensor("model.layers.0.self_attn.q_proj.weight").shape == (64, 64)
        assert handle.get_tensor("model.layers.0.self_attn.q_proj.weight").dtype == torch.float32
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(str(out))
    assert not getattr(merged, "is_quantized", False)
    torch.testing.assert_close(_logits(merged), _logits(wrapped4), rtol=1e-4, atol=1e-4)


def test_bf16_output_and_safe_check_refuses_with_tight_tolerance(tmp_path, capsys):
    base, adapter, wrapper = _trained_adapter(tmp_path)
    out = tmp_path / "merged"
    assert cli(["merge", base, adapter, str(out), "--dtype", "bf16", "--safe", "--tolerance", "1e-9"]) == 2
    assert "merged logits differ" in capsys.readouterr().err
    assert not out.exists()  # nothing half-checked left at OUT
    assert not list(tmp_path.glob(".merged.*"))  # staging folders cleaned up
    assert cli(["merge", base, adapter, str(out), "--dtype", "bf16", "--safe"]) == 0
    with safe_open(str(out / "model.safetensors"), framework="pt") as handle:
        assert {handle.get_tensor(k).dtype for k in handle.keys()} == {torch.bfloat16}
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"


def test_merge_errors_name_the_problem(tmp_path, capsys):
    base, adapter, _ = _trained_adapter(tmp_path)
    assert cli(["merge", base, adapter, str(tmp_path / "m"), "--dtype", "int3"]) == 2
    assert "--dtype 'int3' is invalid" in capsys.readouterr().err
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    assert cli(["merge", base, adapter, str(tmp_path / "full")]) == 2
    assert "already exists and is not empty" in capsys.readouterr().err
    assert cli(["merge", str(tmp_path / "nope"), adapter, str(tmp_path / "m")]) == 2
    assert "does not exist" in capsys.readouterr().err
    other = save_base(make_llama(hidden_size=32, intermediate_size=64), tmp_path / "other")
    assert cli(["merge", other, adapter, str(tmp_path / "m")]) == 2
    assert "has shape" in capsys.readouterr().err
    tied = save_base(make_llama(tie_word_embeddings=True), tmp_path / "tied")
    wrapper = wrap(make_llama(tie_word_embeddings=True), LoRAConfig(r=2, target_modules=["embedding"]))
    wrapper.save_pretrained(str(tmp_path / "emb"))
    assert cli(["merge", tied, str(tmp_path / "emb"), str(tmp_path / "m")]) == 2
    assert "tied" in capsys.readouterr().err
    assert not (tmp_path / "m").exists()


def test_an_fp16_overflow_is_refused_not_written_as_inf(tmp_path, capsys):
    base = save_base(make_llama(), tmp_path / "base")
    wrapper = wrap(make_llama(), LoRAConfig(r=4, lora_alpha=8, target_modules=["q_proj"]))
    with torch.no_grad():  # delta entries: 2 * 4 * 200 * 200 = 320000, beyond fp16's 65504
        for module in wrapper.modules():
            if hasattr(module, "lora_A") and hasattr(module.lora_A, "weight"):
                module.lora_A.weight.fill_(200.0)
                module.lora_B.weight.fill_(200.0)
    wrapper.save_pretrained(str(tmp_path / "adapter"))
    out = tmp_path / "merged"
    assert cli(["merge", base, str(tmp_path / "adapter"), str(out), "--dtype", "fp16"]) == 2
    err = capsys.readouterr().err
    assert "q_proj.weight" in err and "float16" in err and "--dtype fp32 or bf16" in err
    assert not out.exists() and not list(tmp_path.glob(".merged.*"))
    assert cli(["merge", base, str(tmp_path / "adapter"), str(out), "--dtype", "fp32"]) == 0


class _FakeApi:
    calls: list[tuple[str, dict]] = []

    def __init__(self, token=None):
        self.token = token

    def create_repo(self, repo_id, **kwargs):
        _FakeApi.calls.append(("create_repo", {"repo_id": repo_id, **kwargs}))

    def upload_folder(self, **kwargs):
        _FakeApi.calls.append(("upload_folder", kwargs))
        return "https://hub.example/commit/1"


def test_push_uploads_only_adapter_files(tmp_path, monkeypatch, capsys):
    import huggingface_hub

    _, adapter, _ = _trained_adapter(tmp_path)
    Path(adapter, "optimizer.pt").write_bytes(b"x")
    monkeypatch.setattr(huggingface_hub, "HfApi", _FakeApi)
    _FakeApi.calls = []
    assert cli(["push", adapter, "me/tiny-adapter", "--private"]) == 0
    (create, create_kwargs), (upload, upload_kwargs) = _FakeApi.calls
    assert create == "create_repo" and create_kwargs["repo_id"] == "me/tiny-adapter" and create_kwargs["private"] is True
    assert upload == "upload_folder" and upload_kwargs["repo_id"] == "me/tiny-adapter"
    assert sorted(upload_kwargs["allow_patterns"]) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    assert "hub.example" in capsys.readouterr().out
    assert cli(["push", str(tmp_path / "missing"), "me/x"]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_8bit_base_is_dequantized_then_merged(tmp_path):
    dense = save_base(make_llama(), tmp_path / "dense")
    load_quantized(dense, 8).save_pretrained(str(tmp_path / "base8"))
    _, adapter, wrapper = _trained_adapter(tmp_path / "a", target_modules=["q_proj"])
    out = tmp_path / "merged"
    assert cli(["merge", str(tmp_path / "base8"), adapter, str(out)]) == 0
    key = "model.layers.1.self_attn.q_proj.weight"
    with safe_open(str(tmp_path / "base8" / "model.safetensors"), framework="pt") as handle:
        codes, scale = handle.get_tensor(key), handle.get_tensor(key.replace(".weight", ".SCB"))
    expected = codes.float() * (scale.float().unsqueeze(1) / 127.0) + wrapper.base_model.get_submodule(
        "model.layers.1.self_attn.q_proj").delta_weight()
    with safe_open(str(out / "model.safetensors"), framework="pt") as handle:
        assert not any(k.endswith(("SCB", "weight_format")) for k in handle.keys())
        torch.testing.assert_close(handle.get_tensor(key), expected, rtol=0, atol=1e-6)
    assert "quantization_config" not in json.loads((out / "config.json").read_text())


def test_new_token_rows_beyond_the_base_vocabulary_grow_the_merged_model(tmp_path):
    """Adapter trained after resize_token_embeddings (256 -> 258), merged into the 256-row base."""
    base = save_base(make_llama(), tmp_path / "base")
    resized = make_llama()
    resized.resize_token_embeddings(258, mean_resizing=False)
    new = [256, 257]
    wrapper = wrap(resized, LoRAConfig(r=2, target_modules=["q_proj"], init_lora_weights=False,
                                       trainable_token_indices={"model.embed_tokens": new, "lm_head": new}))
    with torch.no_grad():
        for p in wrapper.adapter_parameters().values():
            p.add_(torch.randn_like(p) * 0.1)
    adapter = str(tmp_path / "adapter")
    wrapper.save_pretrained(adapter)
    out = tmp_path / "merged"
    assert cli(["merge", base, adapter, str(out)]) == 0
    assert json.loads((out / "config.json").read_text())["vocab_size"] == 258
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(str(out))
    ids = torch.tensor([[5, 256, 9, 257, 3]])
    torch.testing.assert_close(_logits(merged, ids), _logits(wrapper.eval(), ids), rtol=1e-5, atol=1e-5)
