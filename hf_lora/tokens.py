"""Trainable rows for new tokens (``trainable_token_indices``), in PEFT's trainable-tokens layout.

When a tokenizer gains tokens, ``model.resize_token_embeddings`` appends rows that the pretrained
model never learned. Training the whole embedding to learn them would make every checkpoint
carry a full ``vocab x dim`` matrix; instead only the listed rows are trainable and saved, under
PEFT's key ``<embedding>.token_adapter.trainable_tokens_delta`` (``len(indices) x dim``, holding
the rows' new values).

`TrainableTokens` wraps an ``nn.Embedding`` (or an ``nn.Linear`` output layer, whose rows are the
output tokens). It keeps the rows as they were at wrap time (``original``) and adds
``values - original`` where a listed token appears, so the forward costs a lookup, never a copy of
the weight. At load time ``original`` is whatever the base holds, so the saved values replace
the rows exactly as in PEFT (resized rows are random: their values come from the file).
With tied input/output embeddings the output layer is wrapped too and shares the same values,
so a new token's input row and output row stay one tensor, as in the base model. An embedding
that is also a (plain) LoRA target is wrapped around its `LoRAEmbedding`: the rows add to the
LoRA output, and merge/unmerge handle the inner adapter in the right order.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .layers import LoRALayer


def raw_module(module: nn.Module) -> nn.Module:
    """The innermost wrapped module (a LoRA embedding's own ``base_layer``...)."""
    while isinstance(module, LoRALayer):
        module = module.base_layer
    return module


class TokenAdapter(nn.Module):
    """The trainable rows (``trainable_tokens_delta``) and which tokens they belong to."""

    def __init__(self, rows: torch.Tensor, token_indices: Sequence[int]) -> None:
        super().__init__()
        self.token_indices = tuple(int(i) for i in token_indices)
        # Adapters are fp32 whatever the base dtype (the adapter-dtype policy).
        self.trainable_tokens_delta = nn.Parameter(rows.detach().float().clone())


class TrainableTokens(nn.Module):
    """A frozen embedding (or output layer) whose rows ``token_indices`` are trainable.

    Attributes:
        base_layer: The wrapped module.
        token_adapter: Holds ``trainable_tokens_delta``; absent on a tied output layer, which
            reads its source's (`adapter`).
        merged: The values are written into ``base_layer.weight``.
        disabled: The base rows are used (``disable_adapter``).
    """

    def __init__(self, base_layer: nn.Module, token_indices: Sequence[int], source: TrainableTokens | None = None) -> None:
        super().__init__()
        self.base_layer = base_layer  # the module, or a LoRAEmbedding around it (embedding LoRA + new rows)
        weight = raw_module(base_layer).weight
        self._is_embedding = isinstance(raw_module(base_layer), nn.Embedding)
        self._source = [source] if source is not None else []  # a list: not a submodule, not saved twice
        adapter = source.adapter if source is not None else TokenAdapter(weight[list(token_indices)], token_indices)
        if source is None:
            self.token_adapter = adapter
        index = torch.tensor(adapter.token_indices, dtype=torch.long, device=weight.device)
        self.register_buffer("index", index, persistent=False)
        self.register_buffer("original", weight.detach()[index].float().clone(), persistent=False)
        slot = torch.full((weight.shape[0],), -1, dtype=torch.long, device=index.device)
        slot[index] = torch.arange(len(index), device=index.device)
        self.register_buffer("slot", slot, persistent=False)  # token id -> row of the values, or -1
        self.merged = False
        self._disabled = False
        self._merged_rows: torch.Tensor | None = None

    @property
    def adapter(self) -> TokenAdapter:
        """The `TokenAdapter` holding the values (the tied source's when tied)."""
        return self._source[0].adapter if self._source else self.token_adapter

    @property
    def is_tied(self) -> bool:
        """This layer shares its values with another `TrainableTokens` (tied embeddings)."""
        return bool(self._source)

    def _change(self) -> torch.Tensor:
        return self.adapter.trainable_tokens_delta - self.original

    @property
    def disabled(self) -> bool:
        """Skip the rows' change (and a LoRA embedding inside): ``disable_adapter``."""
        return self._disabled

    @disabled.setter
    def disabled(self, value: bool) -> None:
        self._disabled = value
        if isinstance(self.base_layer, LoRALayer):
            self.base_layer.disabled = value

    def _inactive(self) -> bool:
        owner = self._source[0] if self._source else self
        return self.disabled or owner.merged or self.merged

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        if self._inactive():
            return result
        change = self._change()
        if self._is_embedding:
            slot = self.slot[x]
            hit = (slot >= 0).unsqueeze(-1)
            update = F.embedding(slot.clamp(min=0), change) * hit
            scale = getattr(raw_module(self.base_layer), "embed_scale", None)  # e.g. Gemma's scaled embeddings
            if scale is not None:
                update = update * scale
            return result + update.to(result.dtype)
        # Output layer: each listed row is one output token, so only those logits change.
        columns = x.to(change.dtype) @ change.T
        return result.index_add(-1, self.index, columns.to(result.dtype))

    @torch.no_grad()
    def merge(self, keep_original: bool = True) -> None:
        """Write the values into the weight's rows (the tied layer's weight is the same tensor).

        A LoRA embedding inside is merged first and unmerged last, so the rows kept here are
        the ones `unmerge` must put back before the LoRA delta comes out.
        """
        if not (self.merged or self.is_tied) and not torch.isfinite(self.adapter.trainable_tokens_delta).all():
            raise ValueError("merge of trainable tokens would write NaN or inf rows; nothing was changed.")
        if isinstance(self.base_layer, LoRALayer):
            self.base_layer.merge(keep_original=keep_original)
        if self.merged or self.is_tied:
            return
        weight = raw_module(self.base_layer).weight
        self._merged_rows = weight[self.index].clone()
        weight[self.index] = (weight[self.index].float() + self._change()).to(weight.dtype)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Put the rows back as they were before `merge`."""
        if self.merged:
            raw_module(self.base_layer).weight[self.index] = self._merged_rows
            self._merged_rows = None
            self.merged = False
        if isinstance(self.base_layer, LoRALayer):
            self.base_layer.unmerge()

    def __getattr__(self, name: str) -> Any:
        # Code that reads embedding attributes (num_embeddings, weight, padding_idx) keeps working.
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("base_layer"), name)

    def extra_repr(self) -> str:
        return f"tokens={len(self.adapter.token_indices)}, tied={self.is_tied}, merged={self.merged}"


# --- planning (before the model is touched) ----------------------------------------------------


def _path_of(model: nn.Module, module: nn.Module | None) -> str | None:
    return next((p for p, m in model.named_modules() if m is module and p), None) if module is not None else None


def _check_indices(path: str, module: nn.Module, indices: Sequence[int]) -> None:
    if not isinstance(module, (nn.Embedding, nn.Linear)) or type(module).__module__.startswith("bitsandbytes"):
        raise ValueError(
            f"trainable_token_indices targets {path!r} of type {type(module).__name__}; expected a torch.nn.Embedding "
            "(or an nn.Linear output layer)."
        )
    size = module.weight.shape[0]
    bad = [i for i in indices if i >= size]
    if bad:
        raise ValueError(
            f"trainable_token_indices {bad[:5]} are outside the {size} rows of {path!r}; resize the embeddings "
            "first (model.resize_token_embeddings(len(tokenizer)))."
        )


def plan_trainable_tokens(model: nn.Module, spec: Sequence[int] | Mapping[str, Sequence[int]] | None) -> list[tuple[str, tuple[int, ...], str | None]]:
    """``(path, indices, tied_source_path)`` for every module that gets trainable rows.

    A list applies to the input embedding; a dict maps module names (matched as the path or a
    suffix of it) to indices. An output layer tied to a planned embedding is added with its
    source. Raises ``ValueError`` for unknown names, unsupported modules or indices out of range.
    """
    if not spec:
        return []
    if isinstance(spec, Mapping):
        items = list(spec.items())
    else:
        embedding = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
        path = _path_of(model, embedding)
        if path is None:
            raise ValueError("trainable_token_indices is a list but the model has no input embedding; pass {module_name: indices}.")
        items = [(path, spec)]
    plan: list[tuple[str, tuple[int, ...], str | None]] = []
    for name, indices in items:
        paths = [p for p, _ in model.named_modules() if p and (p == name or p.endswith("." + name))]
        if not paths:
            raise ValueError(f"trainable_token_indices key {name!r} matched no module of the model.")
        for path in paths:
            _check_indices(path, model.get_submodule(path), indices)
            plan.append((path, tuple(indices), None))
    planned = {p for p, _, _ in plan}
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    out_path = _path_of(model, output)
    for path, indices, _ in list(plan):
        source = model.get_submodule(path)
        if out_path and out_path not in planned and isinstance(source, nn.Embedding) and output.weight is source.weight:
            plan.append((out_path, indices, path))
    return plan


def apply_trainable_tokens(model: nn.Module, plan: list[tuple[str, tuple[int, ...], str | None]]) -> None:
    """Replace every planned module by a `TrainableTokens` wrapper (tied ones share values)."""
    for path, indices, source_path in plan:
        parent_path, _, child = path.rpartition(".")
        parent = model.get_submodule(parent_path) if parent_path else model
        source = model.get_submodule(source_path) if source_path else None
        setattr(parent, child, TrainableTokens(getattr(parent, child), indices, source=source))


def token_layers(model: nn.Module) -> list[TrainableTokens]:
    """Every `TrainableTokens` of ``model``, in module order."""
    return [m for m in model.modules() if isinstance(m, TrainableTokens)]


def resize_for_tokens(model: nn.Module, spec: Sequence[int] | Mapping[str, Sequence[int]] | None, source: str) -> None:
    """Grow the input embedding (and a tied output) to hold every listed token id, with a warning.

    Used when loading an adapter trained after ``resize_token_embeddings``: the base from the Hub
    has the old vocabulary size. The new rows are then set from the adapter file.
    """
    if not spec or not hasattr(model, "get_input_embeddings"):
        return
    indices = [i for ids in (spec.values() if isinstance(spec, Mapping) else [spec]) for i in ids]
    size = model.get_input_embeddings().weight.shape[0]
    needed = max(indices) + 1
    if needed > size:
        warnings.warn(
            f"{source}: the adapter trains token ids up to {needed - 1} but the base embedding has {size} rows; "
            f"resizing the base's token embeddings to {needed} (model.resize_token_embeddings). Resize to your "
            "tokenizer's length yourself before loading to choose another size.",
            UserWarning,
            stacklevel=3,
        )
        model.resize_token_embeddings(needed)


def added_token_indices(old_vocab_size: int, model: nn.Module) -> list[int]:
    """The ids of the rows ``resize_token_embeddings`` added: ``old_vocab_size .. new size - 1``."""
    size = model.get_input_embeddings().weight.shape[0]
    if not 0 < old_vocab_size <= size:
        raise ValueError(f"old_vocab_size={old_vocab_size!r} is invalid: expected 1..{size} (the current embedding size).")
    return list(range(old_vocab_size, size))
