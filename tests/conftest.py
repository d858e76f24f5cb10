"""Tiny random-init models built from configs (nothing is downloaded) and shared helpers."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

VOCAB = 256


def make_llama(seed: int = 0, **overrides):
    """A 2-layer LLaMA (hidden 64, GQA 4/2 heads, vocab 256) in eval mode."""
    from transformers import LlamaConfig, LlamaForCausalLM

    kwargs = dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=128, tie_word_embeddings=False,
    )
    kwargs.update(overrides)
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**kwargs)).eval()


def make_gpt2(seed: int = 0):
    """A 2-layer GPT-2 (transformers Conv1D layers), eval mode."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=128)
    return GPT2LMHeadModel(cfg).eval()


def make_bert(seed: int = 0, num_labels: int = 3):
    """A 2-layer BERT sequence classifier, eval mode."""
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    cfg = BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                     vocab_size=VOCAB, max_position_embeddings=128, num_labels=num_labels)
    return BertForSequenceClassification(cfg).eval()


def save_base(model, path) -> str:
    """Save a base model to ``path`` (for from_pretrained and quantized loading)."""
    model.save_pretrained(str(path))
    return str(path)


def load_quantized(path: str, bits: int):
    """Load a saved tiny model with bitsandbytes 4-bit (NF4, double quant) or 8-bit on CPU."""
    pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    if bits == 4:
        q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.float32)
    else:
        q = BitsAndBytesConfig(load_in_8bit=True)
    return AutoModelForCausalLM.from_pretrained(path, quantization_config=q, device_map="cpu").eval()


@pytest.fixture
def llama():
    return make_llama()


@pytest.fixture
def input_ids():
    generator = torch.Generator().manual_seed(1)
    return torch.randint(0, VOCAB, (2, 12), generator=generator)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
