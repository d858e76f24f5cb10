"""Trainable rows for new tokens: only those rows train and are saved; tied embeddings; resize on load; PEFT parity."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open

from hf_lora import LoRAConfig, LoRAModelWrapper, wrap
from hf_lora.tokens import TrainableTokens, added_token_indices
from tests.conftest import VOCAB, make_llama

NEW = [VOCAB, VOCAB + 1, VOCAB + 2, VOCAB + 3]
IDS = torch.tensor([[1, VOCAB, 5, VOCAB + 3, 3], [VOCAB + 2, 2, VOCAB + 1, 9, 1]])
EMB_KEY = "base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta"
HEAD_KEY = "base_model.model.lm_head.token_adapter.trainable_tokens_delta"


def _base(tied: bool, resized: bool = True):
    model = make_llama(tie_word_embeddings=tied)
    if resized:
        model.resize_token_embeddings(VOCAB + 4)
    return model


def _spec(tied: bool):
    # Untied models need the output rows of the new tokens too, or their logits stay random.
    return NEW if tied else {"embed_tokens": NEW, "lm_head": NEW}


def _wrap(tied: bool, base=None, **kw):
    cfg = LoRAConfig(r=4, lora_dropout=0.0, target_modules=["q_proj"], trainable_token_indices=_spec(tied), **kw)
    return wrap(base if base is not None else _base(tied), cfg)


def _perturb(model, seed=0):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.adapter_parameters().values():
            p.add_(0.1 * torch.randn(p.shape, generator=gen))


@pytest.mark.parametrize("tied", [False, True])
def test_fresh_identity_and_only_new_rows_trainable(tied):
    base = _base(tied)
    expected = base(input_ids=IDS).logits
    model = _wrap(tied, base)
    torch.testing.assert_close(model(input_ids=IDS).logits, expected, rtol=0, atol=0)
    token_keys = {EMB_KEY} if tied else {EMB_KEY, HEAD_KEY}
    keys = {k for k in model.state_dict() if "token_adapter" in k}
    assert {"base_model.model." + k[len("base_model."):] for k in keys} == token_keys
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert not any(n.endswith("embed_tokens.base_layer.weight") or n.endswith("lm_head.base_layer.weight") for n in trainable)
    delta = model.base_model.model.embed_tokens.token_adapter.trainable_tokens_delta
    assert tuple(delta.shape) == (4, 64)
    if tied:
        head = model.base_model.lm_head
        assert isinstance(head, TrainableTokens) and head.is_tied and head.adapter.trainable_tokens_delta is delta
        assert model.base_model.lm_head.base_layer.weight is model.base_model.model.embed_tokens.base_layer.weight


@pytest.mark.parametrize("tied", [False, True])
def test_gradient_reaches_only_the_listed_rows(tied):
    model = _wrap(tied)
    ids = torch.tensor([[1, VOCAB + 1, 4]])  # only one new token appears
    model(input_ids=ids, labels=ids).loss.backward()
    grad = model.base_model.model.embed_tokens.token_adapter.trainable_tokens_delta.grad
    assert grad[1].abs().sum() > 0
    if not tied:  # tied: the output rows of every new token also receive gradient through the logits
        assert torch.count_nonzero(grad[[0, 2, 3]]) == 0


def test_embedding_rows_become_the_trained_values():
    model = _wrap(True)
    _perturb(model)
    emb = model.base_model.model.embed_tokens
    values = emb.token_adapter.trainable_tokens_delta.detach()
    out = emb(torch.tensor([VOCAB + 2, 7]))
    torch.testing.assert_close(out[0], values[2])
    torch.testing.assert_close(out[1], emb.base_layer.weight[7])


@pytest.mark.parametrize("tied", [False, True])
def test_merge_unmerge_unload(tied):
    model = _wrap(tied)
    _perturb(model)
    weight_before = model.base_model.model.embed_tokens.base_layer.weight.detach().clone()
    expected = model(input_ids=IDS).logits
    model.merge()
    torch.testing.assert_close(model(input_ids=IDS).logits, expected, rtol=1e-5, atol=1e-5)
    model.unmerge()
    assert torch.equal(model.base_model.model.embed_tokens.base_layer.weight, weight_before)
    plain = model.merge_and_unload()
    assert type(plain.model.embed_tokens) is torch.nn.Embedding and type(plain.lm_head) is torch.nn.Linear
    torch.testing.assert_close(plain(input_ids=IDS).logits, expected, rtol=1e-5, atol=1e-5)


def test_disable_adapter_gives_base_rows():
    base = _base(False)
    expected = base(input_ids=IDS).logits
    model = _wrap(False, base)
    _perturb(model)
    with model.disable_adapter():
        torch.testing.assert_close(model(input_ids=IDS).logits, expected, rtol=0, atol=0)


@pytest.mark.parametrize("tied", [False, True])
def test_save_small_and_load_resizes_the_base(tied, tmp_path):
    model = _wrap(tied)
    _perturb(model)
    expected = model(input_ids=IDS).logits
    model.save_pretrained(str(tmp_path))
    with safe_open(str(tmp_path / "adapter_model.safetensors"), framework="pt") as f:
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    assert shapes[EMB_KEY] == (4, 64) and max(s[0] for s in shapes.values()) < VOCAB  # never a full embedding
    with pytest.warns(UserWarning, match=r"base embedding has 256 rows; resizing the base's token embeddings to 260"):
        loaded = LoRAModelWrapper.from_pretrained(_base(tied, resized=False), str(tmp_path))
    assert loaded.base_model.get_input_embeddings().weight.shape[0] == VOCAB + 4
    assert loaded.lora_config.trainable_token_indices == (tuple(NEW) if tied else {"embed_tokens": tuple(NEW), "lm_head": tuple(NEW)})
    torch.testing.assert_close(loaded(input_ids=IDS).logits, expected, rtol=0, atol=0)


@pytest.mark.parametrize("tied", [False, True])
def test_peft_loads_ours(tied, tmp_path):
    from peft import PeftModel

    model = _wrap(tied)
    _perturb(model)
    expected = model(input_ids=IDS).logits
    model.save_pretrained(str(tmp_path))
    peft_model = PeftModel.from_pretrained(_base(tied), str(tmp_path))
    torch.testing.assert_close(peft_model(input_ids=IDS).logits, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("tied", [False, True])
def test_we_load_peft(tied, tmp_path):
    from peft import LoraConfig, get_peft_model

    theirs = get_peft_model(_base(tied), LoraConfig(r=4, target_modules=["q_proj"], trainable_token_indices=_spec(tied))).eval()
    with torch.no_grad():
        for p in theirs.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn_like(p))
    expected = theirs(input_ids=IDS).logits
    theirs.save_pretrained(str(tmp_path))
    ours = LoRAModelWrapper.from_pretrained(_base(tied), str(tmp_path))
    torch.testing.assert_close(ours(input_ids=IDS).logits, expected, rtol=1e-5, atol=1e-5)


def test_added_token_indices_and_errors():
    model = _base(False)
    assert added_token_indices(VOCAB, model) == NEW
    with pytest.raises(ValueError, match=r"old_vocab_size=300 is invalid: expected 1..260"):
        added_token_indices(300, model)
    with pytest.raises(ValueError, match=r"trainable_token_indices \[256\] are outside the 256 rows of 'model.embed_tokens'; resize"):
        wrap(make_llama(), LoRAConfig(target_modules=["q_proj"], trainable_token_indices=[3, 256]))
    with pytest.raises(ValueError, match=r"key 'embed_tokenz' matched no module"):
        wrap(_base(False), LoRAConfig(target_modules=["q_proj"], trainable_token_indices={"embed_tokenz": [1]}))
    with pytest.raises(ValueError, match=r"\['model.embed_tokens'\] get trainable_token_indices and are also DoRA"):
        wrap(_base(False), LoRAConfig(target_modules=["q_proj", "embed_tokens"], use_dora=True, trainable_token_indices=NEW))
    with pytest.raises(ValueError, match=r"\['lm_head'\] get trainable_token_indices .* or in modules_to_save"):
        wrap(_base(False), LoRAConfig(target_modules=["q_proj"], modules_to_save=["lm_head"], trainable_token_indices={"lm_head": NEW}))
    with pytest.raises(ValueError, match=r"targets 'model.layers.0.self_attn' of type LlamaAttention; expected a torch.nn.Embedding"):
        wrap(_base(False), LoRAConfig(target_modules=["v_proj"], trainable_token_indices={"layers.0.self_attn": [1]}))
    with pytest.raises(ValueError, match=r"trainable_token_indices=\[1, 1\] is invalid"):
        LoRAConfig(trainable_token_indices=[1, 1])


def test_loraplus_puts_token_rows_in_the_embedding_group():
    from hf_lora.optimizers import loraplus_param_groups

    model = _wrap(True)
    groups = {g["name"]: g for g in loraplus_param_groups(model, lr=1e-4, loraplus_lr_embedding=5e-5)}
    delta = model.base_model.model.embed_tokens.token_adapter.trainable_tokens_delta
    assert [id(p) for p in groups["embedding"]["params"]] == [id(delta)] and groups["embedding"]["lr"] == 5e-5


@pytest.mark.parametrize("keep_original", [True, False])
def test_rows_combined_with_embedding_lora(keep_original, tmp_path):
    """New-token rows plus a LoRA adapter on the same embedding (hf-lora only: PEFT refuses the pair)."""
    base = _base(False)
    expected = base(input_ids=IDS).logits
    cfg = LoRAConfig(r=4, lora_dropout=0.0, target_modules=["q_proj", "embed_tokens"], trainable_token_indices=_spec(False))
    model = wrap(base, cfg)
    torch.testing.assert_close(model(input_ids=IDS).logits, expected, rtol=0, atol=0)
    keys = set(model.state_dict())
    assert "base_model.model.embed_tokens.token_adapter.trainable_tokens_delta" in keys
    assert "base_model.model.embed_tokens.base_layer.lora_embedding_A" in keys
    raw = model.base_model.model.embed_tokens.base_layer.base_layer
    assert type(raw) is torch.nn.Embedding and not raw.weight.requires_grad
    _perturb(model)
    trained = model(input_ids=IDS).logits
    with model.disable_adapter():
        torch.testing.assert_close(model(input_ids=IDS).logits, expected, rtol=0, atol=0)
    model.save_pretrained(str(tmp_path))  # before merging: an unmerge by subtraction rounds the base
    weight = raw.weight.detach().clone()
    model.merge(keep_original=keep_original)
    torch.testing.assert_close(model(input_ids=IDS).logits, trained, rtol=1e-5, atol=1e-5)
    model.unmerge()
    torch.testing.assert_close(raw.weight.detach(), weight, rtol=0, atol=0 if keep_original else 1e-6)
    torch.testing.assert_close(model(input_ids=IDS).logits, trained, rtol=1e-5, atol=1e-5)
    with pytest.warns(UserWarning, match="resizing"):
        loaded = LoRAModelWrapper.from_pretrained(_base(False, resized=False), str(tmp_path))
    torch.testing.assert_close(loaded(input_ids=IDS).logits, trained, rtol=0, atol=0)
    plain = model.merge_and_unload()
    assert type(plain.model.embed_tokens) is torch.nn.Embedding and type(plain.lm_head) is torch.nn.Linear
    assert not any("lora" in n or "token_adapter" in n for n, _ in plain.named_parameters())
    torch.testing.assert_close(plain(input_ids=IDS).logits, trained, rtol=1e-5, atol=1e-5)


def test_merge_refuses_non_finite_rows():
    model = _wrap(False)
    with torch.no_grad():
        model.base_model.model.embed_tokens.token_adapter.trainable_tokens_delta[0, 0] = float("nan")
    weight = model.base_model.model.embed_tokens.base_layer.weight.detach().clone()
    with pytest.raises(ValueError, match="would write NaN or inf rows; nothing was changed"):
        model.base_model.model.embed_tokens.merge()
    assert torch.equal(model.base_model.model.embed_tokens.base_layer.weight, weight)
