"""Tied weights and merging: a base weight shared by two modules cannot absorb one adapter.

Many language models tie the input embedding to the output layer (``lm_head.weight is
embed_tokens.weight``). An adapter on ``embed_tokens`` changes the lookup only; merging it
into the shared tensor would also change ``lm_head`` and so the logits. `merge` therefore
refuses while a weight is shared, and `merge_and_unload` first gives the other modules their
own copy of the un-adapted weight (untying them), which keeps every output as it was.
"""

from __future__ import annotations

import logging
from collections import defaultdict

from torch import nn

from .state import lora_layers

logger = logging.getLogger(__name__)


def tied_base_weights(model: nn.Module) -> dict[str, list[str]]:
    """LoRA layer path -> names of the other parameters that are the same tensor as its base weight."""
    layers = lora_layers(model)
    if not layers:
        return {}
    names_by_tensor: dict[int, list[str]] = defaultdict(list)
    for name, param in model.named_parameters(remove_duplicate=False):
        names_by_tensor[id(param)].append(name)
    tied: dict[str, list[str]] = {}
    for path, layer in layers:
        weight = getattr(layer.base_layer, "weight", None)
        own = f"{path}.base_layer.weight" if path else "base_layer.weight"
        others = [name for name in names_by_tensor.get(id(weight), []) if name != own]
        if others:
            tied[path] = others
    return tied


def check_untied(model: nn.Module) -> None:
    """Raise ``ValueError`` if an adapted base weight is shared with another module."""
    tied = tied_base_weights(model)
    if tied:
        path, others = next(iter(tied.items()))
        raise ValueError(
            f"Cannot merge the adapter of {path!r}: its base weight is shared (tied) with "
            f"{', '.join(others)}, so merging would change that module too. Keep the adapter "
            "unmerged, or use merge_and_unload(), which unties the weights first."
        )


def untie_base_weights(model: nn.Module) -> list[str]:
    """Give every other user of an adapted base weight its own frozen copy. Returns their names.

    Also clears ``tie_word_embeddings`` in the model config so that saving and reloading the
    model does not tie the weights again.
    """
    untied: list[str] = []
    for path, others in tied_base_weights(model).items():
        weight = model.get_submodule(path).base_layer.weight
        for name in others:
            owner_path, _, attribute = name.rpartition(".")
            owner = model.get_submodule(owner_path) if owner_path else model
            setattr(owner, attribute, nn.Parameter(weight.detach().clone(), requires_grad=False))
            untied.append(name)
    if untied:
        config = getattr(model, "config", None)
        for cfg in (config, getattr(config, "get_text_config", lambda: None)()):
            if cfg is not None and getattr(cfg, "tie_word_embeddings", False):
                cfg.tie_word_embeddings = False
        logger.warning("Untied %s from adapted weights before merging; the model no longer ties them.", untied)
    return untied
