"""``hf-lora inspect``: the dry run reports what `wrap` then really does."""

from __future__ import annotations

import re

import pytest
from conftest import make_bert, make_gpt2, make_llama, save_base
from safetensors.torch import load_file

from hf_lora import LoRAConfig, wrap
from hf_lora.cli import main
from hf_lora.inspect_model import inspect_model

COUNTS = re.compile(r"^trainable params: [\d,]+ \|\| all params: [\d,]+ \|\| trainable%: [\d.]+$", re.MULTILINE)

CASES = {
    "llama-default": (make_llama, [], {"r": 8, "lora_alpha": 16}),
    "gpt2-attention+embedding": (make_gpt2, ["--target", "attention", "embedding", "--r", "4"],
                                 {"r": 4, "lora_alpha": 8, "target_modules": ["attention", "embedding"]}),
    "bert-classifier-all-linear": (make_bert, ["--target", "all-linear", "--r", "2"],
                                   {"r": 2, "lora_alpha": 4, "target_modules": "all-linear"}),
}


@pytest.mark.parametrize("name", CASES)
def test_inspect_counts_equal_what_wrap_reports(tmp_path, capsys, name):
    make, args, cfg = CASES[name]
    folder = save_base(make(), tmp_path / "model")
    assert main(["inspect", folder, *args]) == 0
    report = capsys.readouterr().out
    wrap(make(), LoRAConfig(**cfg)).print_trainable_parameters()
    reported_by_wrap = capsys.readouterr().out.strip()
    assert COUNTS.findall(report) == [reported_by_wrap]


def test_inspect_groups_the_llama_modules(tmp_path, capsys):
    folder = save_base(make_llama(), tmp_path / "model")
    assert main(["inspect", folder, "--target", "attention", "mlp", "embedding", "--r", "4", "--alpha", "4"]) == 0
    out = capsys.readouterr().out
    assert "LoRA r=4 alpha=4 targets=['attention', 'mlp', 'embedding']" in out
    assert re.search(r"attention\s+8 modules \(k_proj, o_proj, q_proj, v_proj\)", out)
    assert re.search(r"mlp\s+6 modules \(down_proj, gate_proj, up_proj\)", out)
    assert re.search(r"embedding\s+1 modules \(embed_tokens\)", out)


def test_reported_adapter_size_is_the_saved_payload(tmp_path):
    cfg = LoRAConfig(target_modules=["attention", "embedding"], r=4)
    report = inspect_model(make_llama(), cfg)
    wrapper = wrap(make_llama(), cfg)
    wrapper.save_pretrained(str(tmp_path))
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    assert report.adapter_bytes == sum(t.numel() * t.element_size() for t in tensors.values())
    assert report.adapter_params == sum(p.numel() for p in wrapper.adapter_parameters().values())
    assert sorted(p for paths in report.groups.values() for p in paths) == sorted(
        k.removeprefix("base_model.model.").rsplit(".lora_", 1)[0] for k in tensors if "lora_A" in k or "embedding_A" in k)


def test_inspect_touches_no_weights(tmp_path):
    model = make_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    inspect_model(model, LoRAConfig())
    assert all(type(m).__module__.startswith(("transformers", "torch")) for m in model.modules())
    assert all((model.state_dict()[k] == v).all() for k, v in before.items())


def test_inspect_bad_target_suggests_names(tmp_path, capsys):
    folder = save_base(make_llama(), tmp_path / "model")
    capsys.readouterr()  # drop the save progress bar
    assert main(["inspect", folder, "--target", "qproj"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("hf-lora inspect: error: target_modules=['qproj'] matched no module")
    assert "closest module names: q_proj" in err


def test_inspect_missing_model_is_a_clear_error(tmp_path, capsys):
    assert main(["inspect", str(tmp_path / "nowhere")]) == 2
    assert re.search(r"error: cannot read the model config of '.*nowhere'", capsys.readouterr().err)


def test_inspect_bad_rank_is_a_clear_error(tmp_path, capsys):
    folder = save_base(make_llama(), tmp_path / "model")
    assert main(["inspect", folder, "--r", "0"]) == 2
    assert "LoRAConfig.r=0 is invalid" in capsys.readouterr().err
