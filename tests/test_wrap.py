"""`wrap`: what gets injected, what is frozen, how trainable parameters are reported, and the
errors for bad targets. Every failing wrap must leave the model untouched."""

from __future__ import annotations

import re

import pytest
import torch
from conftest import make_bert, make_gpt2, make_llama
from torch import nn

from hf_lora import LoRAConfig, LoRAModelWrapper, wrap
from hf_lora.layers import LoRALayer

LLAMA_ATTN_MLP = [
    f"model.layers.{i}.{mod}" for i in range(2)
    for mod in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
]


def _snapshot(model: nn.Module) -> tuple[list, dict, dict]:
    """Module classes, requires_grad flags and weights: 'exactly as it was'."""
    classes = [(p, type(m)) for p, m in model.named_modules()]
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    weights = {n: t.detach().clone() for n, t in model.state_dict().items()}
    return classes, flags, weights


def assert_unchanged(model: nn.Module, snapshot: tuple[list, dict, dict]) -> None:
    classes, flags, weights = _snapshot(model)
    assert classes == snapshot[0]
    assert flags == snapshot[1]
    assert weights.keys() == snapshot[2].keys()
    for key, value in snapshot[2].items():
        assert torch.equal(weights[key], value), key


def test_wrap_returns_wrapper_around_the_same_model(llama):
    wrapper = wrap(llama)
    assert isinstance(wrapper, LoRAModelWrapper)
    assert wrapper.base_model is llama
    assert wrapper.config is llama.config  # attribute reads fall through
    assert [p for p, m in llama.named_modules() if isinstance(m, LoRALayer)] == LLAMA_ATTN_MLP


def test_default_config_is_attention_and_mlp_r8():
    cfg = LoRAConfig()
    assert (cfg.r, cfg.lora_alpha, cfg.target_modules, cfg.bias) == (8, 16, ("attention", "mlp"), "none")


def test_exactly_adapter_parameters_require_grad(llama):
    wrapper = wrap(llama, LoRAConfig(target_modules=["attention", "mlp", "embedding"]))
    trainable = [n for n, p in wrapper.named_parameters() if p.requires_grad]
    expected = ["base_model.model.embed_tokens.lora_embedding_A", "base_model.model.embed_tokens.lora_embedding_B"]
    expected += [f"base_model.{p}.lora_{ab}.weight" for p in LLAMA_ATTN_MLP for ab in "AB"]
    assert trainable == expected


def test_bias_all_trains_every_bias_and_the_saved_module():
    bert = make_bert()
    wrapper = wrap(bert, LoRAConfig(target_modules=["query", "value"], bias="all", modules_to_save=["classifier"]))
    trainable = {n.removeprefix("base_model.") for n, p in wrapper.named_parameters() if p.requires_grad}
    all_biases = {n.replace("query.bias", "query.base_layer.bias").replace("value.bias", "value.base_layer.bias")
                  for n, _ in make_bert().named_parameters() if n.endswith("bias") and not n.startswith("classifier")}
    loras = {f"bert.encoder.layer.{i}.attention.self.{m}.lora_{ab}.weight" for i in range(2)
             for m in ("query", "value") for ab in "AB"}
    head = {"classifier.trained_module.weight", "classifier.trained_module.bias"}
    assert trainable == all_biases | loras | head
    assert not any(p.requires_grad for p in bert.classifier.original_module.parameters())


def test_bias_lora_only_trains_only_adapted_layers_biases():
    bert = make_bert()
    wrapper = wrap(bert, LoRAConfig(target_modules=["query", "value"], bias="lora_only", modules_to_save=["classifier"]))
    trainable = {n.removeprefix("base_model.") for n, p in wrapper.named_parameters() if p.requires_grad}
    expected = {f"bert.encoder.layer.{i}.attention.self.{m}.{t}" for i in range(2) for m in ("query", "value")
                for t in ("lora_A.weight", "lora_B.weight", "base_layer.bias")}
    expected |= {"classifier.trained_module.weight", "classifier.trained_module.bias"}
    assert trainable == expected


def test_wrap_refreezes_a_model_that_had_everything_trainable():
    model = make_llama().train()
    assert all(p.requires_grad for p in model.parameters())
    wrapper = wrap(model)
    assert {n for n, p in wrapper.named_parameters() if p.requires_grad} == {
        f"base_model.{p}.lora_{ab}.weight" for p in LLAMA_ATTN_MLP for ab in "AB"
    }


def test_injection_order_and_parameter_order_are_deterministic():
    names, values = [], []
    for _ in range(2):
        model = make_gpt2()
        torch.manual_seed(123)  # same seed, same injection order -> the same initial adapters
        wrapper = wrap(model, LoRAConfig(target_modules="all-linear"))
        names.append([n for n, p in wrapper.named_parameters() if p.requires_grad])
        values.append([p.detach().clone() for p in wrapper.parameters() if p.requires_grad])
    assert names[0] == names[1] and len(names[0]) == 2 * 8
    assert all(torch.equal(a, b) for a, b in zip(*values))
    assert names[0][0] == "base_model.transformer.h.0.attn.c_attn.lora_A.weight"


def test_all_linear_skips_the_output_layer(llama):
    wrap(llama, LoRAConfig(target_modules="all-linear"))
    assert [p for p, m in llama.named_modules() if isinstance(m, LoRALayer)] == LLAMA_ATTN_MLP
    assert type(llama.lm_head) is nn.Linear


def test_all_linear_skips_a_classification_head_like_peft():
    peft = pytest.importorskip("peft")
    bert = make_bert()
    wrap(bert, LoRAConfig(target_modules="all-linear"))  # r=8 > 3 labels: the head must not be a target
    ours = sorted(p for p, m in bert.named_modules() if isinstance(m, LoRALayer))
    assert type(bert.classifier).__name__ == "Linear" and len(ours) == 2 * 6 + 1  # + pooler.dense
    theirs_model = peft.get_peft_model(make_bert(), peft.LoraConfig(target_modules="all-linear", task_type="SEQ_CLS"))
    theirs = sorted(p.removeprefix("base_model.model.") for p, m in theirs_model.named_modules()
                    if isinstance(m, peft.tuners.lora.LoraLayer))
    assert ours == theirs


def _tiny(model_type: str) -> nn.Module:
    import transformers as T

    common = {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 4, "vocab_size": 64}
    configs = {
        "mistral": lambda: T.MistralConfig(intermediate_size=64, num_key_value_heads=2, **common),
        "qwen2": lambda: T.Qwen2Config(intermediate_size=64, num_key_value_heads=2, **common),
        "gemma": lambda: T.GemmaConfig(intermediate_size=64, num_key_value_heads=2, head_dim=8, **common),
        "phi3": lambda: T.Phi3Config(intermediate_size=64, pad_token_id=0, **common),
        "phi": lambda: T.PhiConfig(intermediate_size=64, **common),
        "opt": lambda: T.OPTConfig(ffn_dim=64, word_embed_proj_dim=32, **common),
        "gpt_neox": lambda: T.GPTNeoXConfig(intermediate_size=64, **common),
        "falcon": lambda: T.FalconConfig(**common),
    }
    return T.AutoModelForCausalLM.from_config(configs[model_type]())


@pytest.mark.parametrize("model_type", ["mistral", "qwen2", "gemma", "phi3", "phi", "opt", "gpt_neox", "falcon"])
def test_attention_and_mlp_groups_cover_every_linear_layer(model_type):
    def adapted(target) -> list[str]:
        model = _tiny(model_type)
        wrap(model, LoRAConfig(r=2, target_modules=target))
        return sorted(p for p, m in model.named_modules() if isinstance(m, LoRALayer))

    attention, mlp = adapted(["attention"]), adapted(["mlp"])
    assert attention and mlp and not set(attention) & set(mlp)
    assert sorted(attention + mlp) == adapted("all-linear")
    embedding = adapted(["embedding"])
    assert len(embedding) == 1 and embedding[0].endswith(("embed_tokens", "embed_in", "word_embeddings"))


def test_exclude_modules_and_rank_pattern(llama):
    cfg = LoRAConfig(target_modules=["attention"], exclude_modules=["k_proj"], rank_pattern={"v_proj": 2},
                     alpha_pattern={r"model\.layers\.1\.self_attn\.q_proj": 64})
    wrap(llama, cfg)
    layers = {p: m for p, m in llama.named_modules() if isinstance(m, LoRALayer)}
    assert sorted(layers) == sorted(p for p in LLAMA_ATTN_MLP if re.search("q_proj|v_proj|o_proj", p))
    assert layers["model.layers.0.self_attn.v_proj"].r == 2
    assert layers["model.layers.0.self_attn.v_proj"].lora_A.weight.shape == (2, 64)
    assert layers["model.layers.1.self_attn.q_proj"].scaling == 64 / 8
    assert layers["model.layers.0.self_attn.q_proj"].scaling == 16 / 8


def test_eval_model_keeps_adapters_in_eval_mode(llama):
    wrap(llama, LoRAConfig(lora_dropout=0.5))
    assert not any(m.training for m in llama.modules())


def test_print_trainable_parameters_format_and_numbers(llama, capsys):
    wrapper = wrap(llama)
    wrapper.print_trainable_parameters()
    line = capsys.readouterr().out.strip()
    match = re.fullmatch(r"trainable params: ([\d,]+) \|\| all params: ([\d,]+) \|\| trainable%: (\d+\.\d{4})", line)
    assert match, line
    # per layer: q 8*64+64*8, k and v 8*64+32*8, o 8*64+64*8, gate/up/down 8*64+128*8 (or transposed)
    expected_adapter = 2 * (1024 + 768 + 768 + 1024 + 3 * 1536)
    base_total = sum(p.numel() for p in make_llama().parameters())
    assert int(match[1].replace(",", "")) == expected_adapter == 16384
    assert int(match[2].replace(",", "")) == base_total + expected_adapter
    assert float(match[3]) == pytest.approx(100 * expected_adapter / (base_total + expected_adapter), abs=1e-4)


def test_print_trainable_parameters_matches_peft(llama):
    peft = pytest.importorskip("peft")
    ours = wrap(llama, LoRAConfig(target_modules=["attention", "embedding"]))
    theirs = peft.get_peft_model(make_llama(), peft.LoraConfig(r=8, target_modules=[
        "q_proj", "k_proj", "v_proj", "o_proj", "embed_tokens"]))
    assert ours.trainable_parameters() == theirs.get_nb_trainable_parameters()


@pytest.mark.parametrize("bias", ["none", "lora_only", "all"])
def test_trainable_counts_with_bias_and_saved_head_match_peft(bias):
    peft = pytest.importorskip("peft")
    kwargs = {"target_modules": ["query", "value"], "bias": bias, "modules_to_save": ["classifier"]}
    ours = wrap(make_bert(), LoRAConfig(**kwargs)).trainable_parameters()
    assert ours == peft.get_peft_model(make_bert(), peft.LoraConfig(**kwargs)).get_nb_trainable_parameters()


# --- errors --------------------------------------------------------------------------------


def test_target_matching_nothing_lists_close_names(llama):
    snapshot = _snapshot(llama)
    with pytest.raises(ValueError, match=r"target_modules=\['qproj'\] matched no module.*closest module names: q_proj"):
        wrap(llama, LoRAConfig(target_modules=["qproj"]))
    assert_unchanged(llama, snapshot)


def test_target_matching_nothing_on_gpt2_suggests_its_names():
    with pytest.raises(ValueError, match=r"c_attn"):
        wrap(make_gpt2(), LoRAConfig(target_modules=["c_atn"]))


def test_unsupported_module_type_names_path_type_and_supported_types(llama):
    snapshot = _snapshot(llama)
    with pytest.raises(ValueError, match=(
        r"module 'model\.layers\.0\.input_layernorm' of type .*LlamaRMSNorm; supported types: .*"
        r"torch\.nn\.Linear, torch\.nn\.Embedding, transformers\.pytorch_utils\.Conv1D"
    )):
        wrap(llama, LoRAConfig(target_modules=["q_proj", "input_layernorm"]))
    assert_unchanged(llama, snapshot)


def test_wrapping_twice_is_refused(llama):
    wrapper = wrap(llama)
    with pytest.raises(ValueError, match="already wrapped"):
        wrap(wrapper)
    with pytest.raises(ValueError, match="already contains hf_lora LoRA layers"):
        wrap(llama)


def test_wrapping_a_peft_model_is_refused():
    peft = pytest.importorskip("peft")
    model = make_llama()
    peft.get_peft_model(model, peft.LoraConfig(target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="already contains PEFT adapters"):
        wrap(model)


def test_rank_above_layer_dimension_is_refused(llama):
    snapshot = _snapshot(llama)
    with pytest.raises(ValueError, match=r"r=40 for module 'model\.layers\.0\.self_attn\.k_proj' exceeds .*\(32\)"):
        wrap(llama, LoRAConfig(r=40, target_modules=["k_proj"]))
    assert_unchanged(llama, snapshot)


def test_modules_to_save_errors(llama):
    snapshot = _snapshot(llama)
    with pytest.raises(ValueError, match=r"modules_to_save entry 'lm_haed' matched no module; closest names: lm_head"):
        wrap(llama, LoRAConfig(modules_to_save=["lm_haed"]))
    with pytest.raises(ValueError, match=r"both LoRA targets and in modules_to_save"):
        wrap(llama, LoRAConfig(target_modules=["q_proj"], modules_to_save=["q_proj"]))
    with pytest.raises(ValueError, match=r"modules_to_save module 'model\.layers\.0\.self_attn' and LoRA target "
                                         r"'model\.layers\.0\.self_attn\.q_proj' are nested"):
        wrap(llama, LoRAConfig(target_modules=["q_proj"], modules_to_save=["layers.0.self_attn"]))
    assert_unchanged(llama, snapshot)


def test_config_must_be_a_lora_config(llama):
    with pytest.raises(ValueError, match="config must be a LoRAConfig, got dict"):
        wrap(llama, {"r": 8})


# --- tied weights ----------------------------------------------------------------------------


@torch.no_grad()
def _logits(model, ids):
    return model(input_ids=ids).logits


def test_merging_an_adapter_on_a_tied_embedding_is_refused_and_changes_nothing(input_ids):
    model = make_llama(tie_word_embeddings=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    wrapper = wrap(model, LoRAConfig(target_modules=["embedding"], init_lora_weights=False))
    adapted = _logits(wrapper, input_ids)
    weight = model.lm_head.weight.detach().clone()
    with pytest.raises(ValueError, match=r"'model\.embed_tokens'.*shared.*lm_head\.weight"):
        wrapper.merge()
    assert not wrapper.base_model.model.embed_tokens.merged
    assert torch.equal(model.lm_head.weight, weight)
    assert torch.equal(_logits(wrapper, input_ids), adapted)


@pytest.mark.parametrize("targets", [["embedding", "attention"], ["lm_head"]], ids=["embedding", "lm_head"])
def test_merge_and_unload_unties_a_tied_embedding_and_keeps_outputs(input_ids, tmp_path, targets):
    from transformers import AutoModelForCausalLM

    model = make_llama(tie_word_embeddings=True)
    table = model.lm_head.weight.detach().clone()
    wrapper = wrap(model, LoRAConfig(target_modules=targets, init_lora_weights=False))
    adapted = _logits(wrapper, input_ids)
    plain = wrapper.merge_and_unload()
    assert plain.lm_head.weight is not plain.model.embed_tokens.weight
    untouched = plain.model.embed_tokens if targets == ["lm_head"] else plain.lm_head
    assert torch.equal(untouched.weight, table)  # the other user keeps the un-adapted weight
    torch.testing.assert_close(_logits(plain, input_ids), adapted, atol=2e-5, rtol=1e-5)
    plain.save_pretrained(tmp_path)  # and it stays untied through a save/load
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(_logits(reloaded, input_ids), adapted, atol=2e-5, rtol=1e-5)


def test_gpt2_tied_wte_merge_is_refused(input_ids):
    wrapper = wrap(make_gpt2(), LoRAConfig(target_modules=["embedding"], init_lora_weights=False))
    with pytest.raises(ValueError, match=r"'transformer\.wte'.*lm_head\.weight"):
        wrapper.merge()


def test_lora_on_a_tied_lm_head_merge_is_refused():
    wrapper = wrap(make_llama(tie_word_embeddings=True), LoRAConfig(target_modules=["lm_head"]))
    with pytest.raises(ValueError, match=r"'lm_head'.*model\.embed_tokens\.weight"):
        wrapper.merge()


def test_lora_layers_expose_the_base_layers_attributes():
    """transformers reads get_input_embeddings().weight and a linear's in_features on wrapped layers."""
    from conftest import make_llama

    from hf_lora import LoRAConfig, wrap

    model = make_llama()
    embed_weight = model.model.embed_tokens.weight
    q_proj = model.model.layers[0].self_attn.q_proj
    wrapped = wrap(model, LoRAConfig(target_modules=["attention", "embedding"]))
    assert wrapped.get_input_embeddings().weight is embed_weight
    assert wrapped.get_input_embeddings().padding_idx == model.config.pad_token_id
    lora_q = wrapped.base_model.model.layers[0].self_attn.q_proj
    assert lora_q.weight is q_proj.weight
    assert (lora_q.in_features, lora_q.out_features) == (q_proj.in_features, q_proj.out_features)
    with pytest.raises(AttributeError, match="no_such_attribute"):
        _ = lora_q.no_such_attribute
