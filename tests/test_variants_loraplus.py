"""LoRA+: parameter groups, exact per-group learning rates, and use from the stock Trainer."""

from __future__ import annotations

import pytest
import torch

from hf_lora import LoRAConfig, create_loraplus_optimizer, wrap
from hf_lora.optimizers import loraplus_optimizer_from_args, loraplus_param_groups
from tests.conftest import VOCAB, make_llama


def _wrapped(**cfg):
    cfg.setdefault("target_modules", ["q_proj", "v_proj", "embed_tokens"])
    cfg.setdefault("lora_dropout", 0.0)
    return wrap(make_llama(), LoRAConfig(**cfg))


def _ids(params):
    return {id(p) for p in params}


def test_groups_split_a_b_embedding_and_no_decay():
    model = _wrapped(bias="lora_only", modules_to_save=["lm_head"])
    groups = {g["name"]: g for g in loraplus_param_groups(model, lr=1e-4, loraplus_lr_ratio=16, weight_decay=0.1)}
    assert set(groups) == {"lora_A", "lora_B", "embedding", "other"}  # llama q/v have no bias
    base = model.base_model
    q = base.model.layers[0].self_attn.q_proj
    assert id(q.lora_A.weight) in _ids(groups["lora_A"]["params"])
    assert id(q.lora_B.weight) in _ids(groups["lora_B"]["params"])
    emb = base.model.embed_tokens
    assert _ids(groups["embedding"]["params"]) == {id(emb.lora_embedding_A), id(emb.lora_embedding_B)}
    assert _ids(groups["other"]["params"]) == {id(base.lm_head.trained_module.weight)}
    assert len(groups["lora_A"]["params"]) == len(groups["lora_B"]["params"]) == 4  # q, v x 2 layers
    assert groups["lora_A"]["lr"] == 1e-4 and groups["embedding"]["lr"] == 1e-4
    assert groups["lora_B"]["lr"] == pytest.approx(16e-4)
    assert all(g["weight_decay"] == 0.1 for g in groups.values())
    # every trainable parameter is in exactly one group
    listed = [id(p) for g in groups.values() for p in g["params"]]
    assert sorted(listed) == sorted(id(p) for p in model.parameters() if p.requires_grad)


def test_biases_go_to_no_decay_group():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=VOCAB, n_positions=32)).eval()
    model = wrap(gpt2, LoRAConfig(target_modules=["c_attn"], bias="lora_only"))
    groups = {g["name"]: g for g in loraplus_param_groups(model, lr=1e-3, weight_decay=0.01)}
    bias = model.base_model.transformer.h[0].attn.c_attn.base_layer.bias
    assert _ids(groups["no_decay"]["params"]) == {id(bias)}
    assert groups["no_decay"]["weight_decay"] == 0.0 and groups["no_decay"]["lr"] == 1e-3


def test_sgd_step_moves_b_at_ratio_times_lr():
    model = _wrapped(target_modules=["q_proj"], init_lora_weights=False)
    opt = create_loraplus_optimizer(model, torch.optim.SGD, lr=0.01, loraplus_lr_ratio=8)
    ids = torch.randint(0, VOCAB, (2, 6), generator=torch.Generator().manual_seed(0))
    model(input_ids=ids, labels=ids).loss.backward()
    q = model.base_model.model.layers[0].self_attn.q_proj
    a0, b0 = q.lora_A.weight.detach().clone(), q.lora_B.weight.detach().clone()
    ga, gb = q.lora_A.weight.grad.clone(), q.lora_B.weight.grad.clone()
    opt.step()
    torch.testing.assert_close(q.lora_A.weight.detach(), a0 - 0.01 * ga)
    torch.testing.assert_close(q.lora_B.weight.detach(), b0 - 0.08 * gb)


def test_embedding_rate_override():
    model = _wrapped()
    groups = {g["name"]: g for g in loraplus_param_groups(model, lr=1e-4, loraplus_lr_embedding=1e-6)}
    assert groups["embedding"]["lr"] == 1e-6


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"lr": 0}, r"lr=0 is invalid"),
        ({"lr": float("nan")}, r"lr=nan is invalid"),
        ({"lr": 1e-4, "loraplus_lr_ratio": 0.5}, r"loraplus_lr_ratio=0.5 is invalid: expected >= 1"),
        ({"lr": 1e-4, "loraplus_lr_embedding": -1.0}, r"loraplus_lr_embedding=-1.0 is invalid"),
        ({"lr": 1e-4, "weight_decay": -0.1}, r"weight_decay=-0.1 is invalid"),
    ],
)
def test_bad_rates_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        loraplus_param_groups(_wrapped(), **kwargs)


def test_frozen_model_is_refused():
    model = make_llama()
    for p in model.parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        create_loraplus_optimizer(model, torch.optim.AdamW, lr=1e-4)


def test_trainer_uses_the_loraplus_optimizer(tmp_path):
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments

    model = _wrapped(target_modules=["q_proj", "v_proj"])
    args = TrainingArguments(
        output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=2, learning_rate=1e-3,
        weight_decay=0.05, report_to=[], save_strategy="no", logging_steps=1, use_cpu=True,
        lr_scheduler_type="constant", disable_tqdm=True,
    )
    opt = loraplus_optimizer_from_args(model, args, loraplus_lr_ratio=16)
    assert isinstance(opt, torch.optim.AdamW)
    gen = torch.Generator().manual_seed(0)
    rows = [{"input_ids": ids, "labels": ids} for ids in torch.randint(0, VOCAB, (8, 8), generator=gen).tolist()]
    b_before = {n: p.detach().clone() for n, p in model.named_parameters() if n.endswith("lora_B.weight")}
    trainer = Trainer(model=model, args=args, train_dataset=Dataset.from_list(rows), optimizers=(opt, None))
    trainer.train()
    inner = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
    assert inner is opt
    lrs = {g["name"]: g["lr"] for g in inner.param_groups}
    assert lrs == {"lora_A": pytest.approx(1e-3), "lora_B": pytest.approx(16e-3)}
    assert {g["name"]: g["weight_decay"] for g in inner.param_groups} == {"lora_A": 0.05, "lora_B": 0.05}
    assert all(not torch.equal(b_before[n], p) for n, p in model.named_parameters() if n in b_before)
