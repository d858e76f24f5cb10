"""What is adapter state: one structural answer, reused by freeze, count, save, load and callbacks.

A tensor is adapter state when it is a parameter a LoRA layer created (``lora_A``/``lora_B``,
``lora_embedding_A``/``lora_embedding_B``), a parameter of a ``modules_to_save`` copy, or a
bias the config trains. The answer comes from the module structure, never from name patterns,
so a base module that happens to be called ``lora_something`` is not mistaken for an adapter.
"""

from __future__ import annotations

from torch import nn

from .config import BiasMode
from .layers import LoRALayer, TrainedCopy
from .tokens import TokenAdapter


def _join(*parts: str) -> str:
    return ".".join(p for p in parts if p)


def adapter_parameters(model: nn.Module, bias: BiasMode = "none") -> dict[str, nn.Parameter]:
    """Adapter parameters of ``model`` keyed by their path in ``model``, in module order."""
    found: dict[str, nn.Parameter] = {}
    for path, module in model.named_modules():
        if isinstance(module, LoRALayer):
            for attribute in module.adapter_attribute_names:
                owner = getattr(module, attribute)
                if isinstance(owner, nn.Parameter):
                    found[_join(path, attribute)] = owner
                else:
                    for name, param in owner.named_parameters():
                        found[_join(path, attribute, name)] = param
            base_bias = getattr(module.base_layer, "bias", None)
            if bias == "lora_only" and isinstance(base_bias, nn.Parameter):
                found[_join(path, "base_layer.bias")] = base_bias
        elif isinstance(module, TrainedCopy):
            for name, param in module.trained_module.named_parameters():
                found[_join(path, "trained_module", name)] = param
        elif isinstance(module, TokenAdapter):  # trainable rows of new tokens (tokens.py)
            found[_join(path, "trainable_tokens_delta")] = module.trainable_tokens_delta
    if bias == "all":
        for name, param in model.named_parameters():
            if name.rsplit(".", 1)[-1] == "bias" and ".original_module." not in f".{name}":
                found.setdefault(name, param)
    return found


def freeze_base(model: nn.Module, bias: BiasMode = "none") -> int:
    """Make exactly the adapter parameters trainable. Returns how many were re-frozen."""
    trainable = {id(p) for p in adapter_parameters(model, bias).values()}
    refrozen = 0
    for param in model.parameters():
        wanted = id(param) in trainable
        if param.requires_grad and not wanted:
            refrozen += 1
        param.requires_grad_(wanted)
    return refrozen


def _numel(param: nn.Parameter) -> int:
    # bitsandbytes 4-bit packs two weights per byte of its storage dtype.
    if type(param).__name__ == "Params4bit":
        return param.numel() * 2 * param.element_size()
    return param.numel()


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """``(trainable, total)`` parameter counts; 4-bit weights count as unpacked."""
    trainable = total = 0
    for param in model.parameters():
        n = _numel(param)
        total += n
        if param.requires_grad:
            trainable += n
    return trainable, total


def lora_layers(model: nn.Module) -> list[tuple[str, LoRALayer]]:
    """Every LoRA layer of ``model`` with its path, in module order."""
    return [(path, m) for path, m in model.named_modules() if isinstance(m, LoRALayer)]


def peft_key(path: str) -> str:
    """PEFT's on-disk key for an adapter tensor at ``path`` in the base model."""
    return "base_model.model." + path.replace(".trained_module.", ".")
