"""DoRA (Liu et al., 2024): weight-decomposed LoRA, a magnitude vector times a direction.

Each output row of the adapted weight is rescaled to a trained length::

    W' = m * (W + s B A) / ||W + s B A||        (norms per output feature, i.e. per row of the out x in matrix)

(for embeddings, per embedding dimension: the norm runs over the vocabulary, as in PEFT)

``m`` (``lora_magnitude_vector``, one entry per output feature) starts at ``||W||``, so with
``B = 0`` a fresh adapter is the identity. As the paper suggests (section 4.3), the norm is
treated as a constant in the backward pass (detached): gradients flow to ``m``, ``A`` and ``B``
through the numerator only, which saves memory and barely changes training.

The forward never materialises ``W'``. With ``k = m / ||W + s B A||``::

    y = k * (W x) + k * s * B A dropout(x) + bias = base(x) + (k - 1) * (base(x) - bias) + k * s * B A dropout(x)

so the base layer (full-precision or bitsandbytes) still computes ``W x`` itself; only the norm
needs the dense weight. Dropout, as for plain LoRA, applies to the adapter path only.

The classes reuse the LoRA kinds unchanged (``DoRAMixin`` first in the MRO): the base weight
is read/written by the LoRA class (dequantized for 4/8-bit), and ``delta_weight`` returns
``W' - W`` so the shared merge code folds DoRA in exactly.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .config import InitMode
from .layers import LoRAConv1D, LoRAEmbedding, LoRALayer, LoRALinear
from .quantized import LoRALinear4bit, LoRALinear8bit


class DoRAMixin:
    """DoRA on top of a LoRA kind; put it first in the bases.

    The maths works on a "view" of the weight whose rows (``_norm_dim = 1``: Linear, ``out x in``)
    or columns (``_norm_dim = 0``: Embedding, ``vocab x dim``) are the features that get a magnitude.
    """

    adapter_attribute_names = ("lora_A", "lora_B", "lora_magnitude_vector")
    _norm_dim = 1

    def __init__(self, base_layer: nn.Module, *, r: int, scaling: float, dropout: float, init: InitMode) -> None:
        super().__init__(base_layer, r=r, scaling=scaling, dropout=dropout, init=init)  # type: ignore[call-arg]
        self._merge_scale: torch.Tensor | None = None  # k at merge time, to unmerge by division
        # m starts at the current norm, so the layer computes W + s B A exactly (k = 1).
        self.lora_magnitude_vector = nn.Parameter(self.weight_norm().clone())

    # --- the decomposition ------------------------------------------------------------------

    def _dense_base(self) -> torch.Tensor:
        """The base weight as fp32 ``out x in`` (Conv1D stores ``in x out``)."""
        weight = self.read_base_weight()
        return weight.T if isinstance(self, LoRAConv1D) else weight

    def _lora_matrix(self) -> torch.Tensor:
        """``s B A`` as fp32 ``out x in``."""
        return (self.lora_B.weight.float() @ self.lora_A.weight.float()) * self.scaling

    def _to_base_layout(self, view: torch.Tensor) -> torch.Tensor:
        return view.T if isinstance(self, LoRAConv1D) else view

    def _per_feature(self, scale: torch.Tensor) -> torch.Tensor:
        """``scale`` shaped to multiply the view feature-wise."""
        return scale[:, None] if self._norm_dim == 1 else scale[None, :]

    @torch.no_grad()
    def weight_norm(self) -> torch.Tensor:
        """``||W + s B A||`` per feature, without gradient (paper, section 4.3)."""
        return torch.linalg.vector_norm(self._dense_base() + self._lora_matrix(), dim=self._norm_dim)

    def magnitude_scale(self) -> torch.Tensor:
        """``k = m / ||W + s B A||`` (differentiable in ``m`` only)."""
        return self.lora_magnitude_vector / self.weight_norm()

    # --- merge ------------------------------------------------------------------------------

    def delta_weight(self) -> torch.Tensor:
        """``W' - W`` in fp32, in the layout of ``base_layer.weight``.

        While merged the base holds ``W'``, so ``W`` is recovered as ``W' / k - s B A`` with the
        ``k`` stored at merge time; this makes unmerging without a kept copy exact up to rounding.
        """
        lora = self._lora_matrix()
        if self.merged and self._merge_scale is not None:
            merged = self._dense_base()
            scale = self._per_feature(self._merge_scale)
            delta = merged - (merged / scale - lora)
        else:
            base = self._dense_base()
            norm = torch.linalg.vector_norm(base + lora, dim=self._norm_dim)
            scale = self._per_feature(self.lora_magnitude_vector.float() / norm)
            delta = (scale - 1) * base + scale * lora
        return self._to_base_layout(delta)

    @torch.no_grad()
    def merge(self, keep_original: bool = True) -> None:
        if not self.merged:
            self._merge_scale = self.magnitude_scale().float()
        super().merge(keep_original=keep_original)  # type: ignore[misc]

    @torch.no_grad()
    def unmerge(self) -> None:
        super().unmerge()  # type: ignore[misc]
        self._merge_scale = None

    # --- forward ----------------------------------------------------------------------------

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        if self.merged or self.disabled:
            return result
        adapter_x = self._adapter_input(x, self.lora_A.weight.dtype)
        lora = self.lora_B(self.lora_A(self.lora_dropout(adapter_x)) * self.scaling)
        scale = self.magnitude_scale()
        bias = getattr(self.base_layer, "bias", None)
        base_out = result if bias is None else result - bias
        update = (scale - 1) * base_out.to(lora.dtype) + scale * lora
        return result + update.to(result.dtype)

    def extra_repr(self) -> str:
        return super().extra_repr() + ", dora=True"  # type: ignore[misc]


class DoRAEmbedding(DoRAMixin, LoRAEmbedding):
    """DoRA on ``torch.nn.Embedding``: one magnitude per embedding dimension (PEFT's layout).

    The norm is taken over the vocabulary for each of the ``dim`` columns of ``W + s (B A)^T``,
    and ``y = k * (W[x] + s A^T[x] B^T)``.
    """

    adapter_attribute_names = ("lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector")
    _norm_dim = 0

    def _dense_base(self) -> torch.Tensor:
        return self.read_base_weight()

    def _lora_matrix(self) -> torch.Tensor:
        return (self.lora_embedding_B.float() @ self.lora_embedding_A.float()).T * self.scaling

    def _to_base_layout(self, view: torch.Tensor) -> torch.Tensor:
        return view

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        if self.merged or self.disabled:
            return result
        base = self.base_layer
        rows = F.embedding(x, self.lora_embedding_A.T, padding_idx=base.padding_idx,
                           scale_grad_by_freq=base.scale_grad_by_freq, sparse=base.sparse)
        update = (rows * self.scaling) @ self.lora_embedding_B.T
        embed_scale = getattr(base, "embed_scale", None)  # e.g. Gemma: the base output already has it
        if embed_scale is not None:
            update = update * embed_scale
        scale = self.magnitude_scale()
        return (scale * result.to(update.dtype) + scale * update).to(result.dtype)


class DoRALinear(DoRAMixin, LoRALinear):
    """DoRA on ``torch.nn.Linear``."""


class DoRAConv1D(DoRAMixin, LoRAConv1D):
    """DoRA on transformers' ``Conv1D`` (GPT-2)."""


class DoRALinear4bit(DoRAMixin, LoRALinear4bit):
    """DoRA on ``bitsandbytes.nn.Linear4bit``; the norm dequantizes the base each forward."""


class DoRALinear8bit(DoRAMixin, LoRALinear8bit):
    """DoRA on ``bitsandbytes.nn.Linear8bitLt``; the norm dequantizes the base each forward."""


# Most specific first: the quantized kinds subclass LoRALinear.
_DORA_CLASSES: tuple[tuple[type[LoRALayer], type[LoRALayer]], ...] = (
    (LoRALinear4bit, DoRALinear4bit),
    (LoRALinear8bit, DoRALinear8bit),
    (LoRAConv1D, DoRAConv1D),
    (LoRALinear, DoRALinear),
    (LoRAEmbedding, DoRAEmbedding),
)


def dora_class_for(lora_class: type[LoRALayer], path: str) -> type[LoRALayer]:
    """The DoRA version of a LoRA class; ``ValueError`` naming the module when there is none."""
    for plain, dora in _DORA_CLASSES:
        if issubclass(lora_class, plain):
            return dora
    raise ValueError(
        f"use_dora=True is not supported for module {path!r} ({lora_class.__name__}); DoRA supports Linear, "
        "Embedding, Conv1D and bitsandbytes 4/8-bit layers. Exclude it (exclude_modules) or set use_dora=False."
    )
