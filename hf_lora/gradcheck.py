"""Did every adapter tensor get a usable gradient? The tensor side of `LoRACallback`'s guard.

A LoRA run can train nothing without any error: reentrant gradient checkpointing over frozen
inputs, a merged or disabled adapter, or an adapter on a module the forward never calls all
leave ``grad`` at ``None``, and the optimizer silently skips those tensors. This module
classifies each adapter tensor's gradient after a backward pass; the callback decides what to
do with the answer.

One zero gradient is expected rather than a fault: with PEFT's initialisation one factor of
each pair starts at zero (``lora_B``, or ``lora_embedding_A``), so the other factor's gradient
is exactly zero until the first optimizer step moves it. Such tensors are reported as
``waiting`` and re-checked later.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch import nn

from .state import adapter_parameters, lora_layers


@dataclass
class GradientReport:
    """Adapter tensors sorted by the state of their gradient (names are paths in the base model).

    Attributes:
        ok: Finite gradient with at least one non-zero entry.
        missing: ``grad is None``: the tensor was not part of the backward graph.
        nonfinite: The gradient holds NaN or inf.
        zero: The gradient is all zero although nothing explains it.
        waiting: All zero because the partner factor of the same LoRA layer is still zero.
    """

    ok: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    nonfinite: list[str] = field(default_factory=list)
    zero: list[str] = field(default_factory=list)
    waiting: list[str] = field(default_factory=list)

    @property
    def failed(self) -> bool:
        """True when some tensor is missing, non-finite or unexplainably zero."""
        return bool(self.missing or self.nonfinite or self.zero)


def _zero_partners(model: nn.Module) -> set[str]:
    """Paths of LoRA factors whose gradient is structurally zero (another factor of the layer is zero)."""
    expected_zero: set[str] = set()
    for path, layer in lora_layers(model):
        # adapter_parameters on the layer itself yields exactly its own factors.
        factors = {f"{path}.{name}" if path else name: p for name, p in adapter_parameters(layer).items()}
        zero = {name for name, p in factors.items() if not bool(p.detach().any())}
        expected_zero.update(name for name in factors if zero - {name})
    return expected_zero


def gradient_report(model: nn.Module, bias: str = "none", only: Iterable[str] | None = None) -> GradientReport:
    """Classify the current ``.grad`` of every adapter tensor of ``model`` (the wrapped base).

    Args:
        model: The base model holding the LoRA layers (``wrapper.base_model``).
        bias: The config's bias mode, so trained biases count as adapter state.
        only: Restrict the report to these paths (used to re-check ``waiting`` tensors).
    """
    params = adapter_parameters(model, bias)  # type: ignore[arg-type]
    if only is not None:
        keep = set(only)
        params = {k: v for k, v in params.items() if k in keep}
    partners_zero = _zero_partners(model)
    report = GradientReport()
    for name, param in params.items():
        grad = param.grad
        if grad is None:
            report.missing.append(name)
        elif not bool(torch.isfinite(grad).all()):
            report.nonfinite.append(name)
        elif bool(grad.any()):
            report.ok.append(name)
        elif name in partners_zero:
            report.waiting.append(name)
        else:
            report.zero.append(name)
    return report
