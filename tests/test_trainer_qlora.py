"""QLoRA and precision through transformers.Trainer: bitsandbytes 4-bit / 8-bit bases on CPU."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from conftest import load_quantized, make_llama, save_base
from trainer_helpers import (
    StopAfter,
    adapter_snapshot,
    files_in,
    losses,
    safetensors_payload,
    token_dataset,
    trainer_args,
)
from transformers import Trainer

from hf_lora import LoRACallback, LoRAConfig, prepare_for_kbit_training, wrap

bnb = pytest.importorskip("bitsandbytes")


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    return save_base(make_llama(), tmp_path_factory.mktemp("base") / "llama")


def _quantized_weights(model) -> dict[int, torch.Tensor]:
    """Raw storage of every bitsandbytes weight (packed 4-bit bytes / int8 codes), keyed by the
    parameter object's id (wrapping renames the paths but keeps the objects)."""
    return {id(p): p.detach().clone() for p in model.parameters() if type(p).__name__ in ("Params4bit", "Int8Params")}


@pytest.mark.parametrize("bits", [4, 8])
def test_qlora_trains_through_the_stock_trainer(tmp_path, base_dir, bits):
    base = load_quantized(base_dir, bits)
    frozen = _quantized_weights(base)
    assert frozen, "the base holds no bitsandbytes weights"
    model = wrap(base, LoRAConfig(r=4, lora_dropout=0.0, target_modules=["q_proj", "v_proj", "down_proj"]))
    before = adapter_snapshot(model)
    args = trainer_args(tmp_path, max_steps=5, save_strategy="steps", save_steps=5)
    trainer = Trainer(model=model, args=args, train_dataset=token_dataset(4), callbacks=[LoRACallback()])
    trainer.train()

    history = losses(trainer)
    assert history[-1] < history[0] - 0.05, history
    assert all(not torch.equal(v, before[k]) for k, v in model.adapter_parameters().items() if "lora_B" in k)
    after = _quantized_weights(base)
    assert after.keys() == frozen.keys()
    assert all(torch.equal(after[k], frozen[k]) for k in frozen), "a quantized weight changed"
    ckpt = tmp_path / "checkpoint-5"
    assert {"model.safetensors", "adapter_model.safetensors", "adapter_config.json"} <= files_in(ckpt)
    assert set(safetensors_payload(ckpt / "model.safetensors")) == {f"base_model.{k}" for k in model.adapter_parameters()}


def test_wrap_rechecks_that_the_quantizer_is_trainable():
    # The flag that lets Trainer accept a quantized wrapper also skips Trainer's own check.
    base = make_llama()
    base.is_quantized = True
    base.quantization_method = "fake-int2"
    base.hf_quantizer = SimpleNamespace(is_trainable=False)
    with pytest.raises(ValueError, match="quantized with fake-int2, which does not support training"):
        wrap(base, LoRAConfig(r=2))


def test_wrap_upcasts_small_parameters_of_a_bf16_quantized_base(base_dir):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16)
    base = AutoModelForCausalLM.from_pretrained(base_dir, quantization_config=q, dtype=torch.bfloat16, device_map="cpu")
    assert base.model.norm.weight.dtype == torch.bfloat16
    packed = _quantized_weights(base)
    model = wrap(base, LoRAConfig(r=2, target_modules=["q_proj"]))

    one_d = {n: p for n, p in base.named_parameters() if p.ndim == 1}
    assert one_d and all(p.dtype == torch.float32 for p in one_d.values())  # norms
    assert base.lm_head.weight.dtype == torch.bfloat16  # large matrices keep their dtype
    assert base.model.embed_tokens.weight.dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in model.adapter_parameters().values())
    after = _quantized_weights(base)
    assert after.keys() == packed.keys() and all(torch.equal(after[k], packed[k]) for k in packed)
    assert not getattr(base, "_require_grads_hooks", None)  # wrap leaves input grads to checkpointing

    assert prepare_for_kbit_training(model) is model
    hooks = list(base._require_grads_hooks)
    prepare_for_kbit_training(model)  # idempotent: no second hook
    assert base._require_grads_hooks == hooks
    out = base.model.embed_tokens(torch.tensor([[1, 2]]))
    assert out.requires_grad


def test_prepare_for_kbit_training_needs_a_transformers_model_for_input_grads():
    plain = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.LayerNorm(2)).to(torch.float16)
    with pytest.raises(ValueError, match="needs a transformers PreTrainedModel; got Sequential"):
        prepare_for_kbit_training(plain)
    prepare_for_kbit_training(plain, input_grads=False)
    assert plain[1].weight.dtype == torch.float32 and plain[0].weight.dtype == torch.float16


def test_bf16_mixed_precision_keeps_adapter_weights_fp32(tmp_path):
    model = wrap(make_llama(), LoRAConfig(r=4, target_modules=["q_proj", "v_proj"]))
    before = adapter_snapshot(model)
    args = trainer_args(tmp_path, max_steps=2, bf16=True)
    Trainer(model=model, args=args, train_dataset=token_dataset(4), callbacks=[LoRACallback()]).train()
    params = model.adapter_parameters()
    assert all(p.dtype == torch.float32 for p in params.values())
    assert all(not torch.equal(p, before[k]) for k, p in params.items() if "lora_B" in k)
    assert model.base_model.lm_head.weight.dtype == torch.float32


def test_a_quantized_base_is_never_cast_by_to_dtype(tmp_path, base_dir):
    base = load_quantized(base_dir, 4)
    model = wrap(base, LoRAConfig(r=2, target_modules=["q_proj"]))
    packed = _quantized_weights(base)
    with pytest.raises(ValueError, match=r"Cannot cast a quantized base model to torch.bfloat16"):
        model.to(torch.bfloat16)
    with pytest.raises(ValueError, match=r"Cannot cast a quantized base model to torch.float16"):
        model.half()  # nn.Module.half goes through _apply, not to(): must be refused too
    full_eval = Trainer(model=model, args=trainer_args(tmp_path, bf16_full_eval=True), eval_dataset=token_dataset(4))
    with pytest.raises(ValueError, match="Cannot cast a quantized base model"):
        full_eval.evaluate()  # Trainer casts the model for bf16_full_eval
    model.to("cpu")  # a device move is fine
    after = _quantized_weights(base)
    assert after.keys() == packed.keys() and all(torch.equal(after[k], packed[k]) for k in packed)
    assert all(p.dtype == torch.float32 for p in model.adapter_parameters().values())


def test_qlora_4bit_resume_is_bit_exact(tmp_path, base_dir):
    # bitsandbytes on CPU can repack 4-bit weights during eval forwards; evaluation during
    # training must still leave the frozen base, and so the resumed run, unchanged.
    def run(output_dir, init_seed, stop=None, resume=False):
        base = load_quantized(base_dir, 4)
        torch.manual_seed(init_seed)
        model = wrap(base, LoRAConfig(r=2, lora_dropout=0.1, target_modules=["q_proj", "v_proj"]))
        args = trainer_args(output_dir, max_steps=4, save_strategy="steps", save_steps=2, eval_strategy="steps",
                            eval_steps=2, per_device_train_batch_size=2)
        callbacks = [LoRACallback()] + ([stop] if stop else [])
        trainer = Trainer(model=model, args=args, train_dataset=token_dataset(8), eval_dataset=token_dataset(2, seed=3),
                          callbacks=callbacks)
        trainer.train(resume_from_checkpoint=resume or None)
        return model

    full = run(tmp_path / "a", 0)
    run(tmp_path / "b", 0, stop=StopAfter(2))
    resumed = run(tmp_path / "b", 7, resume=True)
    for key, value in full.adapter_parameters().items():
        assert torch.equal(resumed.adapter_parameters()[key], value), key
