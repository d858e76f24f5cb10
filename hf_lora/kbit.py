"""Preparing a bitsandbytes 4-bit / 8-bit base for LoRA training (QLoRA).

Two things matter when the frozen base is quantized:

* Small floating-point parameters (norm weights, biases: every 1-D tensor) are read in every
  forward and kept in fp16/bf16 they lose precision in the statistics a norm computes; upcast
  to fp32 they cost a few kilobytes. Large 2-D matrices that bitsandbytes left unquantized
  (embeddings, ``lm_head``) keep their dtype: upcasting them would undo much of the memory
  saving quantization bought.
* With reentrant gradient checkpointing, a checkpointed block whose inputs do not require grad
  produces no gradient for the adapters inside it. The embedding output of a frozen base never
  requires grad, so a hook marks it as requiring grad.

`wrap` calls ``prepare_for_kbit_training(model, input_grads=False)`` itself for a quantized
base: the upcast is always wanted, and the input-grad hook is installed when Trainer (or the
user) turns checkpointing on, through ``LoRAModelWrapper.activation_checkpointing_enable``.
"""

from __future__ import annotations

import torch
from torch import nn

_QUANTIZED_PARAM_TYPES = ("Params4bit", "Int8Params")


def _is_quantized_param(param: nn.Parameter) -> bool:
    return type(param).__name__ in _QUANTIZED_PARAM_TYPES or not param.is_floating_point()


def upcast_small_parameters(model: nn.Module, dtype: torch.dtype = torch.float32) -> list[str]:
    """Cast every 1-D floating-point, non-quantized parameter of ``model`` to ``dtype``.

    Returns the names of the parameters that were cast (empty when all already were).
    """
    cast: list[str] = []
    for name, param in model.named_parameters():
        if param.ndim > 1 or _is_quantized_param(param) or param.dtype == dtype:
            continue
        # .data keeps the Parameter object (and so any optimizer/hook reference) intact.
        param.data = param.data.to(dtype)
        cast.append(name)
    return cast


def prepare_for_kbit_training(model: nn.Module, *, upcast: bool = True, input_grads: bool = True) -> nn.Module:
    """Make a quantized (or any) base ready for adapter training. Idempotent; returns ``model``.

    Works on the plain transformers model before `wrap` or on the wrapper after it. Nothing
    is frozen or unfrozen here (`wrap` owns that) and quantized weights are never touched.

    Args:
        model: A transformers model, typically loaded with ``BitsAndBytesConfig``, or a
            ``LoRAModelWrapper``.
        upcast: Cast 1-D floating-point parameters (norm weights, biases) to fp32. LoRA
            parameters are already fp32, so they are unaffected.
        input_grads: Register the hook that makes the input embeddings' output require grad,
            so reentrant gradient checkpointing still propagates gradients to the adapters.

    Raises:
        ValueError: ``input_grads=True`` but the model has no ``enable_input_require_grads``
            (it is not a transformers ``PreTrainedModel``).
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if upcast:
        upcast_small_parameters(base)
    if input_grads:
        enable = getattr(base, "enable_input_require_grads", None)
        if enable is None:
            raise ValueError(
                f"prepare_for_kbit_training(input_grads=True) needs a transformers PreTrainedModel; got "
                f"{type(base).__name__}. Pass input_grads=False, or make the first layer's output require grad yourself."
            )
        if not getattr(base, "_require_grads_hooks", None):
            enable()
    return model
