"""PEFT compatibility both ways, checked against the installed ``peft``.

* ours -> PEFT: ``peft.PeftModel.from_pretrained`` on a folder we wrote gives our logits;
* PEFT -> ours: a folder written by ``get_peft_model(...).save_pretrained`` loads with
  `LoRAModelWrapper.from_pretrained` and gives PEFT's logits.

Adapters are random (``init_lora_weights=False``) so that a dropped or misplaced tensor shows.
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import make_bert, make_gpt2, make_llama
from safetensors.torch import load_file

from hf_lora import LoRAConfig, LoRAModelWrapper, wrap

peft = pytest.importorskip("peft")

LLAMA_ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

# name -> (model factory, hf_lora config kwargs, equivalent PEFT LoraConfig kwargs)
CASES = {
    "linear": (make_llama, {"target_modules": ["attention", "mlp"]}, {"target_modules": LLAMA_ALL}),
    "embedding": (make_llama, {"target_modules": ["embedding"]}, {"target_modules": ["embed_tokens"]}),
    "conv1d+tied-wte": (make_gpt2, {"target_modules": ["c_attn", "c_proj", "c_fc", "wte"]},
                        {"target_modules": ["c_attn", "c_proj", "c_fc", "wte"], "fan_in_fan_out": True}),
    "patterns+rslora": (
        make_llama,
        {"target_modules": ["attention"], "r": 4, "lora_alpha": 8, "use_rslora": True,
         "rank_pattern": {"v_proj": 2, "model.layers.1.self_attn.q_proj": 6}, "alpha_pattern": {"o_proj": 3}},
        {"target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"], "r": 4, "lora_alpha": 8, "use_rslora": True,
         "rank_pattern": {"v_proj": 2, "model.layers.1.self_attn.q_proj": 6}, "alpha_pattern": {"o_proj": 3}},
    ),
    "bert-lora-only+head": (
        make_bert,
        {"target_modules": ["query", "value"], "bias": "lora_only", "modules_to_save": ["classifier"]},
        {"target_modules": ["query", "value"], "bias": "lora_only", "modules_to_save": ["classifier"]},
    ),
}


def _inputs(ids: torch.Tensor) -> dict[str, torch.Tensor]:
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


@torch.no_grad()
def _logits(model, ids):
    return model(**_inputs(ids)).logits


def _perturb_extras(params) -> None:
    """Move trained biases / saved heads away from the base so that losing them shows."""
    with torch.no_grad():
        for name, param in params:
            if "lora_" not in name:
                param.add_(0.05)


@pytest.mark.parametrize("name", CASES)
def test_peft_loads_our_adapter_with_our_logits(tmp_path, input_ids, name):
    make, ours_cfg, _ = CASES[name]
    wrapper = wrap(make(), LoRAConfig(init_lora_weights=False, lora_dropout=0.0, **ours_cfg))
    _perturb_extras(wrapper.adapter_parameters().items())
    wrapper.save_pretrained(str(tmp_path))
    ours = _logits(wrapper, input_ids)
    base = _logits(make(), input_ids)
    assert (ours - base).abs().max() > 1e-3
    theirs_model = peft.PeftModel.from_pretrained(make(), str(tmp_path)).eval()
    torch.testing.assert_close(_logits(theirs_model, input_ids), ours, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", CASES)
def test_we_load_a_peft_adapter_with_peft_logits(tmp_path, input_ids, name):
    make, _, peft_cfg = CASES[name]
    torch.manual_seed(5)
    theirs_model = peft.get_peft_model(make(), peft.LoraConfig(init_lora_weights=False, lora_dropout=0.0, **peft_cfg))
    _perturb_extras((n, p) for n, p in theirs_model.named_parameters() if p.requires_grad)
    theirs_model.save_pretrained(str(tmp_path))
    theirs = _logits(theirs_model.eval(), input_ids)
    ours_model = LoRAModelWrapper.from_pretrained(make(), str(tmp_path))
    torch.testing.assert_close(_logits(ours_model, input_ids), theirs, atol=1e-5, rtol=1e-5)
    ours_keys = {k.replace(".trained_module.", ".") for k in ours_model.state_dict()}
    assert {k.replace("base_model.", "base_model.model.", 1) for k in ours_keys} == {
        k for k in load_file(tmp_path / "adapter_model.safetensors") if "lora_" in k or "classifier" in k
        or k.endswith("base_layer.bias")}


def test_peft_embedding_file_with_a_full_base_copy_loads(tmp_path, input_ids):
    theirs_model = peft.get_peft_model(make_llama(), peft.LoraConfig(target_modules=["embed_tokens"],
                                                                     init_lora_weights=False))
    theirs_model.save_pretrained(str(tmp_path), save_embedding_layers=True)
    keys = set(load_file(tmp_path / "adapter_model.safetensors"))
    assert any(k.endswith("embed_tokens.base_layer.weight") for k in keys)  # PEFT writes the base table
    ours = LoRAModelWrapper.from_pretrained(make_llama(), str(tmp_path))
    torch.testing.assert_close(_logits(ours, input_ids), _logits(theirs_model.eval(), input_ids), atol=1e-5, rtol=1e-5)
    # ...and we do not: saving it again writes only the low-rank factors.
    ours.save_pretrained(str(tmp_path / "again"))
    assert set(load_file(tmp_path / "again" / "adapter_model.safetensors")) == {
        "base_model.model.model.embed_tokens.lora_embedding_A", "base_model.model.model.embed_tokens.lora_embedding_B"}


def test_bias_all_adapter_loads_in_peft(tmp_path, input_ids):
    wrapper = wrap(make_bert(), LoRAConfig(target_modules=["attention"], bias="all", init_lora_weights=False))
    _perturb_extras(wrapper.adapter_parameters().items())
    wrapper.save_pretrained(str(tmp_path))
    # Without the head in modules_to_save, "SEQ_CLS" would make PEFT look for classifier weights.
    assert json.loads((tmp_path / "adapter_config.json").read_text())["task_type"] is None
    theirs = peft.PeftModel.from_pretrained(make_bert(), str(tmp_path)).eval()
    torch.testing.assert_close(_logits(theirs, input_ids), _logits(wrapper, input_ids), atol=1e-5, rtol=1e-5)


def test_seq_cls_task_type_is_kept_when_the_head_is_saved(tmp_path):
    wrap(make_bert(), LoRAConfig(target_modules=["query"], modules_to_save=["classifier"])).save_pretrained(tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["task_type"] == "SEQ_CLS"


def test_peft_seq_cls_adapter_with_implicit_heads_loads(tmp_path, input_ids):
    theirs = peft.get_peft_model(make_bert(), peft.LoraConfig(task_type="SEQ_CLS", target_modules=["query"],
                                                                init_lora_weights=False))
    _perturb_extras((n, p) for n, p in theirs.named_parameters() if p.requires_grad)
    theirs.save_pretrained(str(tmp_path))
    # PEFT lists its implicit heads, including 'score', which BERT does not have
    assert json.loads((tmp_path / "adapter_config.json").read_text())["modules_to_save"] == ["classifier", "score"]
    ours = LoRAModelWrapper.from_pretrained(make_bert(), str(tmp_path))
    torch.testing.assert_close(_logits(ours, input_ids), _logits(theirs.eval(), input_ids), atol=1e-5, rtol=1e-5)


def test_fresh_adapters_match_peft_parameter_shapes():
    ours = wrap(make_gpt2(), LoRAConfig(target_modules=["c_attn", "c_fc", "wte"]))
    theirs = peft.get_peft_model(make_gpt2(), peft.LoraConfig(target_modules=["c_attn", "c_fc", "wte"],
                                                                fan_in_fan_out=True))
    ours_shapes = {k.replace("base_model.", "", 1): tuple(v.shape) for k, v in ours.state_dict().items()}
    theirs_shapes = {k.replace("base_model.model.", "").replace(".default", ""): tuple(p.shape)
                     for k, p in theirs.named_parameters() if p.requires_grad}
    assert ours_shapes == theirs_shapes


@pytest.mark.parametrize("extra", [{"modules_to_save": ["classifier"]}, {"task_type": "SEQ_CLS"}], ids=["head", "seq-cls"])
def test_peft_bias_all_adapter_with_a_saved_head_loads(tmp_path, input_ids, extra):
    theirs = peft.get_peft_model(make_bert(), peft.LoraConfig(target_modules=["query"], bias="all",
                                                                init_lora_weights=False, **extra))
    _perturb_extras((n, p) for n, p in theirs.named_parameters() if p.requires_grad)
    theirs.save_pretrained(str(tmp_path))
    assert "base_model.model.classifier.modules_to_save.bias" in load_file(tmp_path / "adapter_model.safetensors")
    ours = LoRAModelWrapper.from_pretrained(make_bert(), str(tmp_path))
    torch.testing.assert_close(_logits(ours, input_ids), _logits(theirs.eval(), input_ids), atol=1e-5, rtol=1e-5)


def _make_gemma3():
    from transformers import AutoModelForCausalLM, Gemma3TextConfig

    torch.manual_seed(0)
    cfg = Gemma3TextConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                           num_key_value_heads=2, head_dim=8, vocab_size=256, tie_word_embeddings=False)
    return AutoModelForCausalLM.from_config(cfg).eval()


def test_scaled_embedding_adapter_matches_peft_and_its_own_merge(tmp_path, input_ids):
    """Gemma 3 multiplies inside its embedding module; the low-rank delta must be scaled too."""
    wrapper = wrap(_make_gemma3(), LoRAConfig(target_modules=["embedding"], init_lora_weights=False))
    assert float(wrapper.base_model.model.embed_tokens.base_layer.embed_scale) != 1.0
    ours = _logits(wrapper, input_ids)
    wrapper.save_pretrained(str(tmp_path))
    theirs = peft.PeftModel.from_pretrained(_make_gemma3(), str(tmp_path)).eval()
    torch.testing.assert_close(_logits(theirs, input_ids), ours, atol=1e-5, rtol=1e-5)
    wrapper.merge()
    torch.testing.assert_close(_logits(wrapper, input_ids), ours, atol=1e-5, rtol=1e-5)
