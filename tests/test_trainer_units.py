"""Fast checks of the pieces behind LoRACallback: gradient classification, metrics, messages."""

from __future__ import annotations

import pytest
import torch
from conftest import make_llama
from trainer_helpers import trainer_args

from hf_lora import LoRAConfig, wrap
from hf_lora.callbacks import _gradient_error, training_metrics
from hf_lora.gradcheck import gradient_report

Q = "model.layers.0.self_attn.q_proj"
EMB = "model.embed_tokens"


def _backward(model) -> None:
    ids = torch.randint(0, 256, (2, 8), generator=torch.Generator().manual_seed(0))
    model(input_ids=ids, labels=ids).loss.backward()


@pytest.fixture
def model():
    torch.manual_seed(0)
    return wrap(make_llama(), LoRAConfig(r=2, lora_dropout=0.0, target_modules=["q_proj", "embed_tokens"]))


def test_fresh_adapters_report_structural_zeros_as_waiting(model):
    _backward(model)
    report = gradient_report(model.base_model)
    assert not report.failed
    # Linear: B starts at zero, so A's gradient is exactly zero. Embedding: A starts at zero, so B's is.
    assert f"{Q}.lora_A.weight" in report.waiting and f"{EMB}.lora_embedding_B" in report.waiting
    assert f"{Q}.lora_B.weight" in report.ok and f"{EMB}.lora_embedding_A" in report.ok
    assert not report.missing and not report.zero and not report.nonfinite

    with torch.no_grad():  # after an optimizer step the zero factors have moved
        for name, p in model.adapter_parameters().items():
            if name in report.waiting or name in report.ok:
                p.add_(0.01)
    model.zero_grad()
    _backward(model)
    assert set(gradient_report(model.base_model, only=report.waiting).ok) == set(report.waiting)


def test_missing_nonfinite_and_unexplained_zero_gradients_fail(model):
    model.base_model.model.layers[1].self_attn.q_proj.merge()
    _backward(model)
    params = model.adapter_parameters()
    params[f"{Q}.lora_B.weight"].grad.fill_(float("nan"))
    params[f"{EMB}.lora_embedding_A"].grad.zero_()  # its partner B is non-zero: no excuse
    report = gradient_report(model.base_model)
    assert report.failed
    assert report.missing == ["model.layers.1.self_attn.q_proj.lora_A.weight", "model.layers.1.self_attn.q_proj.lora_B.weight"]
    assert report.nonfinite == [f"{Q}.lora_B.weight"]
    assert report.zero == [f"{EMB}.lora_embedding_A"]

    message = str(_gradient_error(report, trainer_args("unused")))
    assert "No gradient (not part of the backward graph): model.layers.1.self_attn.q_proj.lora_A.weight" in message
    assert "merged" in message and "NaN/inf gradient" in message and "fp16 overflow" in message
    assert "All-zero gradient" in message and "-100" in message
    assert "LoRACallback(check_gradients=False)" in message


def test_training_metrics_keep_the_latest_loss_and_eval_values():
    history = [
        {"loss": 5.0, "grad_norm": 1.0, "learning_rate": 0.01, "epoch": 0.5, "step": 1},
        {"eval_loss": 4.0, "eval_runtime": 0.1, "eval_samples_per_second": 9.0, "epoch": 0.5, "step": 1},
        {"loss": 3.0, "epoch": 1.0, "step": 2},
        {"train_loss": 4.0, "train_runtime": 1.0, "total_flos": 1e6, "step": 2},
    ]
    assert training_metrics(history) == {"loss": 3.0, "eval_loss": 4.0, "train_loss": 4.0}
    assert training_metrics([]) == {}


def test_on_save_writes_into_the_step_folder_and_skips_a_missing_one(tmp_path, model, caplog):
    import logging

    from transformers import TrainerControl, TrainerState

    from hf_lora import LoRACallback

    args, control = trainer_args(tmp_path), TrainerControl()
    (tmp_path / "checkpoint-3").mkdir()
    LoRACallback().on_save(args, TrainerState(global_step=3), control, model=model)
    assert {p.name for p in (tmp_path / "checkpoint-3").iterdir()} == {"adapter_config.json", "adapter_model.safetensors", "README.md"}

    (tmp_path / "checkpoint-4").mkdir()
    LoRACallback(save_adapter=False).on_save(args, TrainerState(global_step=4), control, model=model)
    assert not list((tmp_path / "checkpoint-4").iterdir())

    with caplog.at_level(logging.WARNING, logger="hf_lora"):
        LoRACallback().on_save(args, TrainerState(global_step=5), control, model=model)  # e.g. under HP search
    assert not (tmp_path / "checkpoint-5").exists()
    assert any("checkpoint-5 not found" in r.getMessage() for r in caplog.records)


def test_callback_writes_no_adapter_files_under_sharding_set_by_accelerate_env(tmp_path, monkeypatch):
    """FSDP/ZeRO-3 from an accelerate config file only sets env vars; the export must still stand down."""
    from types import SimpleNamespace

    from hf_lora import LoRACallback
    from hf_lora.callbacks import is_sharded_training

    args = SimpleNamespace(fsdp="", deepspeed=None, should_save=True, output_dir=str(tmp_path))
    assert not is_sharded_training(args)
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    assert is_sharded_training(args)
    (tmp_path / "checkpoint-3").mkdir()
    state = SimpleNamespace(global_step=3, log_history=[])
    LoRACallback().on_save(args, state, None, model=None)
    assert list((tmp_path / "checkpoint-3").iterdir()) == []
