"""End-to-end transformers.Trainer runs on a tiny LLaMA: checkpoints, LoRACallback, resume, eval.

Every run is a few optimizer steps on CPU; see tests/trainer_helpers.py for the data and args.
"""

from __future__ import annotations

import logging

import pytest
import torch
from conftest import make_llama
from trainer_helpers import (
    StopAfter,
    adapter_snapshot,
    files_in,
    frozen_snapshot,
    lora_llama,
    losses,
    read_json,
    safetensors_payload,
    token_dataset,
    trainer_args,
)
from transformers import Trainer, TrainerCallback

from hf_lora import LoRACallback, LoRAModelWrapper

TRAINER_FILES = {"model.safetensors", "optimizer.pt", "rng_state.pth", "scheduler.pt", "trainer_state.json", "training_args.bin"}
ADAPTER_FILES = {"adapter_config.json", "adapter_model.safetensors", "README.md"}


def _adapter_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.adapter_parameters().values())


class GradRecorder(TrainerCallback):
    """Keeps the adapter gradients seen at the first optimizer step."""

    grads: dict[str, torch.Tensor] | None = None

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if self.grads is None:
            self.grads = {k: p.grad.detach().clone() for k, p in model.adapter_parameters().items()}


# --- plain Trainer, no callback -------------------------------------------------------------------


def test_plain_trainer_trains_and_checkpoints_hold_only_the_adapter(tmp_path):
    model = lora_llama()
    before_adapter, before_frozen = adapter_snapshot(model), frozen_snapshot(model)
    trainer = Trainer(model=model, args=trainer_args(tmp_path, max_steps=6, save_strategy="steps", save_steps=3),
                      train_dataset=token_dataset(4))
    trainer.train()

    history = losses(trainer)
    assert len(history) == 6 and history[-1] < history[0] - 0.1, history
    after = model.adapter_parameters()
    assert all(not torch.equal(after[k], before_adapter[k]) for k in after if k.endswith("lora_B.weight"))
    for key, value in frozen_snapshot(model).items():
        assert torch.equal(value, before_frozen[key]), f"frozen tensor {key} changed"

    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-3", "checkpoint-6"]
    ckpt = tmp_path / "checkpoint-6"
    assert files_in(ckpt) == TRAINER_FILES
    saved = safetensors_payload(ckpt / "model.safetensors")
    assert set(saved) == {f"base_model.{k}" for k in model.adapter_parameters()}
    for key, param in model.adapter_parameters().items():
        assert torch.equal(saved[f"base_model.{key}"], param.detach())
    assert (ckpt / "model.safetensors").stat().st_size <= 2 * _adapter_bytes(model)


# --- LoRACallback ---------------------------------------------------------------------------------


def test_callback_checkpoints_load_in_hf_lora_and_peft_with_equal_logits(tmp_path):
    peft = pytest.importorskip("peft")
    model = lora_llama(lora_dropout=0.1)
    trainer = Trainer(model=model, args=trainer_args(tmp_path, max_steps=4, save_strategy="steps", save_steps=2),
                      train_dataset=token_dataset(8), callbacks=[LoRACallback()])
    trainer.train()

    for step in (2, 4):
        assert files_in(tmp_path / f"checkpoint-{step}") == TRAINER_FILES | ADAPTER_FILES
    ckpt = tmp_path / "checkpoint-4"
    adapter_file = ckpt / "adapter_model.safetensors"
    weights = adapter_file.stat().st_size + (ckpt / "model.safetensors").stat().st_size
    assert weights <= 2 * adapter_file.stat().st_size
    payload = safetensors_payload(adapter_file)
    assert sum(t.numel() * t.element_size() for t in payload.values()) == _adapter_bytes(model)
    assert read_json(ckpt / "adapter_config.json")["r"] == 4

    ids = token_dataset(2, seed=5)["input_ids"]
    ids = torch.tensor(ids)
    model.eval()
    with torch.no_grad():
        expected = model(input_ids=ids).logits
        ours = LoRAModelWrapper.from_pretrained(make_llama(), str(ckpt))
        theirs = peft.PeftModel.from_pretrained(make_llama(), str(ckpt)).eval()
        ours_logits, peft_logits = ours(input_ids=ids).logits, theirs(input_ids=ids).logits
    torch.testing.assert_close(ours_logits, expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(peft_logits, ours_logits, rtol=0, atol=1e-5)
    assert not torch.allclose(expected, make_llama()(input_ids=ids).logits)  # the adapter does something


def test_callback_refreezes_strays_keeps_modules_to_save_and_logs_once(tmp_path, caplog):
    model = lora_llama(modules_to_save=["lm_head"])
    stray = model.base_model.model.norm.weight
    stray.requires_grad_(True)  # a user unfroze a base parameter by hand
    norm_before = stray.detach().clone()
    head_before = model.base_model.lm_head.trained_module.weight.detach().clone()
    trainer = Trainer(model=model, args=trainer_args(tmp_path, max_steps=2), train_dataset=token_dataset(4),
                      callbacks=[LoRACallback()])
    with caplog.at_level(logging.INFO, logger="hf_lora"):
        trainer.train()

    assert not stray.requires_grad and torch.equal(stray.detach(), norm_before)
    assert not torch.equal(model.base_model.lm_head.trained_module.weight, head_before)
    refrozen = [r for r in caplog.records if "re-froze 1 parameters" in r.getMessage()]
    assert len(refrozen) == 1 and "model.norm.weight" in refrozen[0].getMessage()
    counts = [r for r in caplog.records if "trainable params" in r.getMessage()]
    assert len(counts) == 1
    trainable, total = model.trainable_parameters()
    assert f"trainable params: {trainable:,d} || all params: {total:,d}" in counts[0].getMessage()


def test_callback_refuses_frozen_adapter_parameters(tmp_path):
    model = lora_llama()
    model.base_model.model.layers[0].self_attn.q_proj.lora_A.weight.requires_grad_(False)
    trainer = Trainer(model=model, args=trainer_args(tmp_path, max_steps=1), train_dataset=token_dataset(4),
                      callbacks=[LoRACallback()])
    with pytest.raises(ValueError, match=r"adapter parameters are frozen.*layers\.0\.self_attn\.q_proj\.lora_A.*is_trainable=True"):
        trainer.train()


def test_callback_rejects_a_model_not_built_by_wrap(tmp_path):
    with pytest.raises(TypeError, match="LoRACallback needs the model returned by hf_lora.wrap.*LlamaForCausalLM"):
        Trainer(model=make_llama(), args=trainer_args(tmp_path), train_dataset=token_dataset(4), callbacks=[LoRACallback()])


# --- the zero-gradient guard ----------------------------------------------------------------------


class DropInputGradHook(TrainerCallback):
    """Undo what activation_checkpointing_enable installed: the embedding-output grad hook."""

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        model.get_base_model().disable_input_require_grads()


def test_gradient_guard_fires_on_reentrant_checkpointing_without_input_grads(tmp_path, caplog):
    # lm_head is adapted too, so the loss still requires grad and backward runs; the layers'
    # adapters sit inside reentrant checkpoints whose inputs do not require grad.
    model = lora_llama(target_modules=["q_proj", "v_proj", "lm_head"])
    args = trainer_args(tmp_path, max_steps=2, activation_checkpointing=True,
                        activation_checkpointing_kwargs={"use_reentrant": True})
    trainer = Trainer(model=model, args=args, train_dataset=token_dataset(4),
                      callbacks=[DropInputGradHook(), LoRACallback()])
    expected = r"(?s)No gradient.*layers\.0\.self_attn\.q_proj\.lora_A.*use_reentrant=True"
    with caplog.at_level(logging.WARNING, logger="hf_lora"), pytest.raises(RuntimeError, match=expected):
        trainer.train()
    assert trainer.state.global_step == 0  # stopped before the first optimizer step was taken
    # The callback saw the missing hook at train begin and said so before the first step.
    assert sum("no input-grad hook" in r.getMessage() for r in caplog.records) == 1


def test_gradient_guard_fires_on_a_merged_layer(tmp_path):
    model = lora_llama(init_lora_weights="gaussian")
    model.base_model.model.layers[1].mlp.down_proj.merge()
    trainer = Trainer(model=model, args=trainer_args(tmp_path, max_steps=2), train_dataset=token_dataset(4),
                      callbacks=[LoRACallback()])
    with pytest.raises(RuntimeError, match=r"(?s)No gradient.*layers\.1\.mlp\.down_proj\.lora_A.*merged") as info:
        trainer.train()
    assert "layers.0" not in str(info.value)  # only the merged layer is named


def test_gradient_guard_waits_for_zero_initialised_factors(tmp_path):
    # Warmup makes step 1's learning rate 0: lora_B stays zero and lora_A's gradient is exactly
    # zero for two steps. That is expected, not a fault; the guard re-checks until B moved.
    guard = LoRACallback()
    model = lora_llama()
    args = trainer_args(tmp_path, max_steps=4, lr_scheduler_type="linear", warmup_steps=2)
    Trainer(model=model, args=args, train_dataset=token_dataset(4), callbacks=[guard]).train()
    assert guard._pending is None
    assert all(bool(p.any()) for k, p in model.adapter_parameters().items() if "lora_B" in k)


# --- exact resume ---------------------------------------------------------------------------------


def test_resume_after_interruption_is_bit_exact(tmp_path):
    def run(output_dir, init_seed, *extra_callbacks, resume=False):
        model = lora_llama(init_seed=init_seed, lora_dropout=0.1)
        args = trainer_args(output_dir, max_steps=6, save_strategy="steps", save_steps=2, eval_strategy="steps",
                            eval_steps=2, per_device_train_batch_size=2, lr_scheduler_type="linear")
        trainer = Trainer(model=model, args=args, train_dataset=token_dataset(8), eval_dataset=token_dataset(4, seed=3),
                          callbacks=[LoRACallback(), *extra_callbacks])
        trainer.train(resume_from_checkpoint=resume or None)
        return model, trainer

    full, full_trainer = run(tmp_path / "a", init_seed=0)
    stopped, _ = run(tmp_path / "b", 0, StopAfter(4))
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == ["checkpoint-2", "checkpoint-4"]
    assert not all(torch.equal(full.adapter_parameters()[k], v) for k, v in stopped.adapter_parameters().items())

    resumed, resumed_trainer = run(tmp_path / "b", init_seed=123, resume=True)  # different init: all from the file
    assert resumed_trainer.state.global_step == 6
    for key, value in full.adapter_parameters().items():
        assert torch.equal(resumed.adapter_parameters()[key], value), key
    assert losses(resumed_trainer)[-2:] == losses(full_trainer)[-2:]


# --- Trainer features -----------------------------------------------------------------------------


def test_eval_loss_with_extra_dataset_column_removed(tmp_path):
    args = trainer_args(tmp_path, max_steps=2, eval_strategy="steps", eval_steps=1, remove_unused_columns=True)
    trainer = Trainer(model=lora_llama(), args=args, train_dataset=token_dataset(4, extra_column=True),
                      eval_dataset=token_dataset(4, seed=2, extra_column=True))
    assert trainer.label_names == ["labels"]
    trainer.train()
    eval_losses = [e["eval_loss"] for e in trainer.state.log_history if "eval_loss" in e]
    assert len(eval_losses) == 2 and all(torch.isfinite(torch.tensor(eval_losses)))


def test_load_best_model_at_end_restores_the_best_adapter(tmp_path):
    scores = iter([1.0, 0.0, 0.0])  # the first evaluation (step 2) is the best

    def compute_metrics(_):
        return {"score": next(scores)}

    model = lora_llama()
    args = trainer_args(tmp_path, max_steps=6, eval_strategy="steps", eval_steps=2, save_strategy="steps",
                        save_steps=2, load_best_model_at_end=True, metric_for_best_model="score",
                        greater_is_better=True, save_total_limit=2)
    trainer = Trainer(model=model, args=args, train_dataset=token_dataset(8), eval_dataset=token_dataset(4, seed=2),
                      compute_metrics=compute_metrics, callbacks=[LoRACallback()])
    trainer.train()
    assert trainer.state.best_model_checkpoint.endswith("checkpoint-2")
    best = safetensors_payload(tmp_path / "checkpoint-2" / "model.safetensors")
    last = safetensors_payload(tmp_path / "checkpoint-6" / "model.safetensors")
    for key, param in model.adapter_parameters().items():
        assert torch.equal(param.detach(), best[f"base_model.{key}"])
    assert any(not torch.equal(best[k], last[k]) for k in best)


@pytest.mark.parametrize("reentrant", [True, False])
def test_gradient_checkpointing_trains_every_adapter(tmp_path, caplog, reentrant):
    model = lora_llama()
    before = adapter_snapshot(model)
    args = trainer_args(tmp_path, max_steps=3, activation_checkpointing=True,
                        activation_checkpointing_kwargs={"use_reentrant": reentrant})
    with caplog.at_level(logging.WARNING, logger="hf_lora"):
        Trainer(model=model, args=args, train_dataset=token_dataset(4), callbacks=[LoRACallback()]).train()
    assert not [r for r in caplog.records if "input-grad hook" in r.getMessage()]
    model.base_model.disable_input_require_grads()  # the hook was installed once, so it can be removed
    assert not model.base_model.model.embed_tokens(torch.tensor([[1, 2]])).requires_grad
    assert model.base_model.is_activation_checkpointing
    changed = [k for k, v in model.adapter_parameters().items() if not torch.equal(v, before[k])]
    assert sorted(changed) == sorted(before)


def _plain_equivalent(**config):
    """A plain transformers model with the effective weights of ``lora_llama(**config)`` (LoRA folded in)."""
    return lora_llama(**config).merge_and_unload()


def test_label_smoothing_loss_equals_the_unwrapped_model(tmp_path):
    model = lora_llama(init_lora_weights=False)  # random B: the adapter changes the outputs
    plain = _plain_equivalent(init_lora_weights=False)
    eval_ds = token_dataset(8, seed=4)
    results = {}
    for name, m in {"wrapped": model, "plain": plain}.items():
        args = trainer_args(tmp_path / name, label_smoothing_factor=0.1)
        results[name] = Trainer(model=m, args=args, eval_dataset=eval_ds).evaluate()["eval_loss"]
    unsmoothed = Trainer(model=model, args=trainer_args(tmp_path / "raw"), eval_dataset=eval_ds).evaluate()["eval_loss"]
    assert results["wrapped"] == pytest.approx(results["plain"], abs=1e-5)
    assert abs(results["wrapped"] - unsmoothed) > 1e-3  # smoothing was applied


def test_gradient_accumulation_scales_like_the_unwrapped_model(tmp_path):
    data = token_dataset(8, masked=True)  # examples with different numbers of label tokens
    no_clip = {"max_steps": 1, "max_grad_norm": 0.0, "logging_steps": 1}

    def first_step(model, out, batch, accumulation):
        recorder = GradRecorder()
        args = trainer_args(out, per_device_train_batch_size=batch, gradient_accumulation_steps=accumulation, **no_clip)
        trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[recorder])
        trainer.train()
        return losses(trainer)[0], recorder.grads

    loss_ga, grads_ga = first_step(lora_llama(init_lora_weights=False), tmp_path / "ga", batch=2, accumulation=2)
    loss_full, grads_full = first_step(lora_llama(init_lora_weights=False), tmp_path / "full", batch=4, accumulation=1)
    assert loss_ga == pytest.approx(loss_full, rel=1e-5)
    for key in grads_full:
        torch.testing.assert_close(grads_ga[key], grads_full[key], rtol=1e-4, atol=1e-7)

    plain = _plain_equivalent(init_lora_weights=False).requires_grad_(True)  # full fine-tuning, same weights
    args = trainer_args(tmp_path / "plain", per_device_train_batch_size=2, gradient_accumulation_steps=2, **no_clip)
    plain_trainer = Trainer(model=plain, args=args, train_dataset=data)
    plain_trainer.train()
    assert loss_ga == pytest.approx(losses(plain_trainer)[0], rel=1e-5)


class FeatureProbe(TrainerCallback):
    """Records, during training, the NEFTune alpha set on the input embeddings."""

    neftune_alpha = None

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        self.neftune_alpha = getattr(model.get_input_embeddings(), "neftune_noise_alpha", None)


@pytest.mark.parametrize(
    "feature",
    [
        {"neftune_noise_alpha": 5.0},
        {"train_sampling_strategy": "group_by_length"},
        {"torch_compile": True, "torch_compile_backend": "eager"},
    ],
    ids=["neftune", "group_by_length", "torch_compile"],
)
def test_trainer_features_train_the_adapter(tmp_path, feature):
    model = lora_llama()
    before = adapter_snapshot(model)
    args = trainer_args(tmp_path, max_steps=2, save_strategy="steps", save_steps=2, **feature)
    probe = FeatureProbe()
    trainer = Trainer(model=model, args=args, train_dataset=token_dataset(4), callbacks=[LoRACallback(), probe])
    trainer.train()
    # The feature really was active (not silently dropped because the model is a wrapper).
    if "neftune_noise_alpha" in feature:
        assert probe.neftune_alpha == 5.0
    if "train_sampling_strategy" in feature:
        assert type(trainer._get_train_sampler()).__name__ == "LengthGroupedSampler"
    if "torch_compile" in feature:
        assert type(trainer.model_wrapped).__name__ == "OptimizedModule"
    assert all(not torch.equal(v, before[k]) for k, v in model.adapter_parameters().items() if "lora_B" in k)
    saved = safetensors_payload(tmp_path / "checkpoint-2" / "model.safetensors")
    assert set(saved) == {f"base_model.{k}" for k in model.adapter_parameters()}
