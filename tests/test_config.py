"""`LoRAConfig`: validation (each error names field, value and what is valid), per-module values,
and the dict round trip used by ``adapter_config.json``."""

from __future__ import annotations

import dataclasses
import math

import pytest

from hf_lora import LoRAConfig


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        ({"r": 0}, r"LoRAConfig\.r=0 is invalid: expected a positive integer"),
        ({"r": -4}, r"LoRAConfig\.r=-4 is invalid"),
        ({"r": 2.0}, r"LoRAConfig\.r=2\.0 is invalid"),
        ({"r": True}, r"LoRAConfig\.r=True is invalid"),
        ({"lora_alpha": 0}, r"LoRAConfig\.lora_alpha=0 is invalid: expected a positive finite number"),
        ({"lora_alpha": -1.5}, r"LoRAConfig\.lora_alpha=-1\.5 is invalid"),
        ({"lora_alpha": math.inf}, r"LoRAConfig\.lora_alpha=inf is invalid"),
        ({"lora_dropout": 1.0}, r"LoRAConfig\.lora_dropout=1\.0 is invalid: expected a probability in \[0, 1\)"),
        ({"lora_dropout": -0.1}, r"LoRAConfig\.lora_dropout=-0\.1 is invalid"),
        ({"lora_dropout": "0.1"}, r"LoRAConfig\.lora_dropout='0\.1' is invalid"),
        ({"bias": "some"}, r"LoRAConfig\.bias='some' is invalid: expected one of 'none', 'all', 'lora_only'"),
        ({"init_lora_weights": "kaiming"}, r"init_lora_weights='kaiming' is invalid: expected True, False.* 'gaussian'"),
        ({"init_lora_weights": 1}, r"init_lora_weights=1 is invalid"),
        ({"target_modules": []}, r"target_modules=\[\] is invalid: expected a non-empty list"),
        ({"target_modules": ""}, r"target_modules='' is invalid"),
        ({"target_modules": None}, r"target_modules=None is invalid"),
        ({"target_modules": "q_proj("}, r"target_modules='q_proj\(' is invalid: expected a valid regular expression"),
        ({"target_modules": ["q_proj", 3]}, r"target_modules=\['q_proj', 3\] is invalid: expected a list of non-empty"),
        ({"rank_pattern": {"q_proj": 0}}, r"rank_pattern=.* positive integers as values \(bad entry 'q_proj': 0\)"),
        ({"alpha_pattern": {"q_proj": -2}}, r"alpha_pattern=.* positive finite numbers as values"),
        ({"rank_pattern": ["q_proj"]}, r"rank_pattern=\['q_proj'\] is invalid: expected a dict"),
        ({"use_rslora": "yes"}, r"use_rslora='yes' is invalid: expected True or False"),
        ({"modules_to_save": []}, r"modules_to_save=\[\] is invalid"),
        ({"task_type": 3}, r"task_type=3 is invalid"),
    ],
)
def test_invalid_values_name_field_value_and_valid_range(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        LoRAConfig(**kwargs)


def test_config_is_frozen_and_keyword_only():
    cfg = LoRAConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.r = 4  # type: ignore[misc]
    with pytest.raises(TypeError):
        LoRAConfig(8)  # type: ignore[misc]
    with pytest.raises(TypeError):
        cfg.rank_pattern["x"] = 2  # type: ignore[index]


def test_normalisation_makes_lists_immutable():
    cfg = LoRAConfig(target_modules=["q_proj", "v_proj"], modules_to_save="score", lora_dropout=0)
    assert cfg.target_modules == ("q_proj", "v_proj")
    assert cfg.modules_to_save == ("score",)
    assert cfg.lora_dropout == 0.0 and isinstance(cfg.lora_dropout, float)


def test_per_module_rank_alpha_and_scaling():
    cfg = LoRAConfig(r=8, lora_alpha=16, rank_pattern={"v_proj": 4, r"layers\.1\..*q_proj": 2},
                     alpha_pattern={"v_proj": 32})
    assert cfg.rank_for("model.layers.0.self_attn.q_proj") == 8
    assert cfg.rank_for("model.layers.1.self_attn.q_proj") == 2
    assert cfg.rank_for("model.layers.0.self_attn.v_proj") == 4
    assert cfg.rank_for("model.layers.0.self_attn.vv_proj") == 8  # suffix match is per dotted name
    assert cfg.scaling_for("model.layers.0.self_attn.v_proj") == 32 / 4
    assert cfg.scaling_for("model.layers.0.self_attn.q_proj") == 2.0
    rs = LoRAConfig(r=16, lora_alpha=8, use_rslora=True)
    assert rs.scaling_for("anything") == pytest.approx(8 / 4)


def test_dict_round_trip():
    cfg = LoRAConfig(r=4, lora_alpha=8, target_modules=["q_proj"], rank_pattern={"q_proj": 2},
                     modules_to_save=["lm_head"], bias="lora_only", init_lora_weights="gaussian")
    data = cfg.to_dict()
    assert data["target_modules"] == ["q_proj"] and data["rank_pattern"] == {"q_proj": 2}
    assert LoRAConfig.from_dict(data) == cfg


def test_from_dict_accepts_peft_bookkeeping_and_rejects_features_it_lacks():
    peft_dict = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"], "inference_mode": True,
                 "base_model_name_or_path": "x", "use_dora": False, "megatron_config": None, "rank_pattern": None}
    assert LoRAConfig.from_dict(peft_dict, source="f.json").r == 4
    with pytest.raises(ValueError, match=r"f\.json: peft_type='IA3' is not supported; hf_lora loads only 'LORA'"):
        LoRAConfig.from_dict({**peft_dict, "peft_type": "IA3"}, source="f.json")
    with pytest.raises(ValueError, match=r"f\.json: layer_replication=\[\[0, 1\]\] is a PEFT feature hf_lora does not"):
        LoRAConfig.from_dict({**peft_dict, "layer_replication": [[0, 1]]}, source="f.json")
    with pytest.raises(ValueError, match=r"f\.json: 'target_modules' is missing"):
        LoRAConfig.from_dict({"peft_type": "LORA", "r": 4}, source="f.json")
    with pytest.raises(ValueError, match=r"f\.json: LoRAConfig\.r=0 is invalid"):
        LoRAConfig.from_dict({**peft_dict, "r": 0}, source="f.json")
    with pytest.raises(ValueError, match=r"f\.json: expected a JSON object, got list"):
        LoRAConfig.from_dict([1], source="f.json")  # type: ignore[arg-type]
