"""LoRA+ (Hayou et al., 2024): train ``B`` with a larger learning rate than ``A``.

With ``B`` zero at init, plain LoRA with one learning rate learns features inefficiently as the
width grows; LoRA+ sets ``lr_B = loraplus_lr_ratio * lr_A``. This module only builds parameter
groups: which parameter is an ``A``, a ``B`` or something else is read from the LoRA layers
themselves (never from name patterns), and weight decay follows ``transformers.Trainer``'s rule
(no decay for biases and normalisation weights).

Use it from the stock Trainer::

    opt = create_loraplus_optimizer(model, torch.optim.AdamW, lr=2e-4, loraplus_lr_ratio=16)
    Trainer(model=model, args=args, optimizers=(opt, None), ...)
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from .state import lora_layers
from .tokens import TokenAdapter

# transformers.Trainer.get_decay_parameter_names: these names never get weight decay.
_NO_DECAY_PATTERNS = [r"bias", r"layernorm", r"rmsnorm", r"(?:^|\.)norm(?:$|\.)", r"_norm(?:$|\.)"]

#: Group names, in the order the optimizer receives them.
GROUP_NAMES: tuple[str, ...] = ("lora_A", "lora_B", "embedding", "other", "no_decay")


def _check_rate(name: str, value: object, *, at_least: float = 0.0) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > at_least
    if not ok:
        raise ValueError(f"{name}={value!r} is invalid: expected a finite number > {at_least:g}.")
    return float(value)


def _lora_roles(model: nn.Module) -> dict[int, str]:
    """``id(param) -> "lora_A" | "lora_B" | "embedding"`` for every LoRA factor in ``model``."""
    roles: dict[int, str] = {}
    for _, layer in lora_layers(model):
        for attribute in layer.adapter_attribute_names:
            owner = getattr(layer, attribute)
            params = [owner] if isinstance(owner, nn.Parameter) else list(owner.parameters())
            if attribute.startswith("lora_embedding_"):
                role = "embedding"  # token ids are one-hot inputs: the width argument of LoRA+ does not apply
            elif attribute == "lora_B":
                role = "lora_B"
            elif attribute == "lora_A":
                role = "lora_A"
            elif attribute == "lora_magnitude_vector":
                role = "no_decay"  # DoRA magnitude: decay would pull the weight norms toward zero
            else:
                continue  # other adapter tensors (e.g. DoRA magnitude) train at the base rate
            for param in params:
                roles[id(param)] = role
    for module in model.modules():
        if isinstance(module, TokenAdapter):  # new-token rows are embedding rows too
            roles[id(module.trainable_tokens_delta)] = "embedding"
    return roles


def decay_parameter_names(model: nn.Module) -> set[str]:
    """Names of the parameters Trainer would apply weight decay to (not biases, not norms)."""
    from transformers.trainer_pt_utils import get_parameter_names

    return set(get_parameter_names(model, [nn.LayerNorm], _NO_DECAY_PATTERNS))


def loraplus_param_groups(
    model: nn.Module,
    *,
    lr: float,
    loraplus_lr_ratio: float = 16.0,
    loraplus_lr_embedding: float | None = None,
    weight_decay: float = 0.0,
) -> list[dict[str, Any]]:
    """The LoRA+ parameter groups of ``model``'s trainable parameters (empty groups left out).

    Groups (each dict also carries a ``"name"``):

    * ``lora_A``: ``A`` factors of linear-type layers, ``lr``, ``weight_decay``.
    * ``lora_B``: ``B`` factors, ``lr * loraplus_lr_ratio``, ``weight_decay``.
    * ``embedding``: both factors of embedding adapters and new-token rows, ``loraplus_lr_embedding``
      (default ``lr``: the ratio is derived for dense inputs, not one-hot token ids).
    * ``other``: any other trainable weight (``modules_to_save`` copies...), ``lr``, ``weight_decay``.
    * ``no_decay``: trainable biases and norm weights, ``lr``, no weight decay.

    Raises:
        ValueError: a rate is not a positive finite number, the ratio is below 1, or the model
            has no trainable parameter.
    """
    lr = _check_rate("lr", lr)
    ratio = _check_rate("loraplus_lr_ratio", loraplus_lr_ratio)
    if ratio < 1:
        raise ValueError(f"loraplus_lr_ratio={loraplus_lr_ratio!r} is invalid: expected >= 1 (lr_B / lr_A; 16 is typical).")
    emb_lr = lr if loraplus_lr_embedding is None else _check_rate("loraplus_lr_embedding", loraplus_lr_embedding)
    if isinstance(weight_decay, bool) or not isinstance(weight_decay, (int, float)) or not weight_decay >= 0:
        raise ValueError(f"weight_decay={weight_decay!r} is invalid: expected a number >= 0.")
    roles = _lora_roles(model)
    decay = decay_parameter_names(model)
    buckets: dict[str, list[nn.Parameter]] = {name: [] for name in GROUP_NAMES}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        role = roles.get(id(param))
        if role is None:
            role = "other" if name in decay else "no_decay"
        buckets[role].append(param)
    if not any(buckets.values()):
        raise ValueError("The model has no trainable parameters; wrap it with hf_lora.wrap before building an optimizer.")
    settings = {
        "lora_A": (lr, weight_decay),
        "lora_B": (lr * ratio, weight_decay),
        "embedding": (emb_lr, weight_decay),
        "other": (lr, weight_decay),
        "no_decay": (lr, 0.0),
    }
    return [
        {"name": name, "params": buckets[name], "lr": settings[name][0], "weight_decay": float(settings[name][1])}
        for name in GROUP_NAMES
        if buckets[name]
    ]


def create_loraplus_optimizer(
    model: nn.Module,
    optimizer_cls: type[torch.optim.Optimizer],
    lr: float,
    loraplus_lr_ratio: float = 16.0,
    *,
    loraplus_lr_embedding: float | None = None,
    weight_decay: float = 0.0,
    **kwargs: Any,
) -> torch.optim.Optimizer:
    """An optimizer over ``model``'s trainable parameters with LoRA+ learning rates.

    Args:
        model: A wrapped model (``hf_lora.wrap``); only trainable parameters are optimized.
        optimizer_cls: e.g. ``torch.optim.AdamW`` or ``bitsandbytes.optim.PagedAdamW8bit``.
        lr: Learning rate of ``A`` (and of non-LoRA trainable parameters).
        loraplus_lr_ratio: ``lr_B / lr_A``, >= 1. The paper uses 2^4 = 16 for most runs; lower
            ``lr`` a little (e.g. by 2x) compared with plain LoRA.
        loraplus_lr_embedding: Learning rate of embedding adapters; defaults to ``lr``.
        weight_decay: Applied to every group except biases and norm weights (Trainer's rule).
        **kwargs: Passed to ``optimizer_cls`` (``betas``, ``eps``...).

    Returns:
        ``optimizer_cls(groups, lr=lr, **kwargs)``; pass it to ``Trainer(optimizers=(opt, None))``.
    """
    groups = loraplus_param_groups(
        model, lr=lr, loraplus_lr_ratio=loraplus_lr_ratio,
        loraplus_lr_embedding=loraplus_lr_embedding, weight_decay=weight_decay,
    )
    return optimizer_cls(groups, lr=lr, **kwargs)


def loraplus_optimizer_from_args(model: nn.Module, args: Any, loraplus_lr_ratio: float = 16.0) -> torch.optim.Optimizer:
    """`create_loraplus_optimizer` with the optimizer, lr and weight decay a Trainer would use.

    Args:
        model: The wrapped model.
        args: ``transformers.TrainingArguments`` (``optim``, ``learning_rate``, ``weight_decay``,
            Adam betas/eps are honoured).
        loraplus_lr_ratio: ``lr_B / lr_A``.
    """
    from transformers import Trainer

    optimizer_cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(args, model)
    kwargs = dict(kwargs)
    lr = kwargs.pop("lr", args.learning_rate)
    return create_loraplus_optimizer(
        model, optimizer_cls, lr, loraplus_lr_ratio, weight_decay=args.weight_decay, **kwargs
    )
