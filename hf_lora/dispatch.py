"""Which LoRA class wraps which base layer: one ordered table, first match wins.

Quantized kinds come first because bitsandbytes layers subclass ``nn.Linear``. bitsandbytes is
only looked at when it is already imported (a model holding its layers has imported it).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from .layers import LoRAConv1D, LoRAEmbedding, LoRALayer, LoRALinear
from .quantized import LoRALinear4bit, LoRALinear8bit


def _is_bnb(module: nn.Module, class_name: str) -> bool:
    bnb = sys.modules.get("bitsandbytes")
    return bnb is not None and isinstance(module, getattr(bnb.nn, class_name))


def _is_conv1d(module: nn.Module) -> bool:
    pytorch_utils = sys.modules.get("transformers.pytorch_utils")
    return pytorch_utils is not None and isinstance(module, pytorch_utils.Conv1D)


@dataclass(frozen=True)
class LayerKind:
    """One row of the dispatch table."""

    description: str
    matches: Callable[[nn.Module], bool]
    lora_class: type[LoRALayer]
    is_linear: bool  # counted by the "all-linear" group


DISPATCH_TABLE: tuple[LayerKind, ...] = (
    LayerKind("bitsandbytes.nn.Linear8bitLt", lambda m: _is_bnb(m, "Linear8bitLt"), LoRALinear8bit, True),
    LayerKind("bitsandbytes.nn.Linear4bit", lambda m: _is_bnb(m, "Linear4bit"), LoRALinear4bit, True),
    LayerKind("torch.nn.Linear", lambda m: isinstance(m, nn.Linear), LoRALinear, True),
    LayerKind("torch.nn.Embedding", lambda m: isinstance(m, nn.Embedding), LoRAEmbedding, False),
    LayerKind("transformers.pytorch_utils.Conv1D", _is_conv1d, LoRAConv1D, True),
)

SUPPORTED_TYPES = ", ".join(kind.description for kind in DISPATCH_TABLE)


def find_kind(module: nn.Module) -> LayerKind | None:
    """The first table row that accepts ``module``, or ``None``."""
    for kind in DISPATCH_TABLE:
        if kind.matches(module):
            return kind
    return None


def lora_class_for(module: nn.Module, path: str, *, use_dora: bool = False) -> type[LoRALayer]:
    """The LoRA (or, with ``use_dora``, DoRA) class for ``module``; ``ValueError`` naming the path and type if unsupported."""
    kind = find_kind(module)
    if kind is None:
        raise ValueError(
            f"Cannot put a LoRA adapter on module {path!r} of type {type(module).__module__}."
            f"{type(module).__qualname__}; supported types: {SUPPORTED_TYPES}."
        )
    if use_dora:
        from .dora import dora_class_for

        return dora_class_for(kind.lora_class, path)
    return kind.lora_class
