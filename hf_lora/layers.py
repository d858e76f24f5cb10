"""LoRA layers: a frozen ``base_layer`` plus a trainable low-rank update.

Every class computes ``base(x) + scaling * B(A(dropout(x)))``. They share one small mixin,
`LoRALayer`, that owns the flags (merged / disabled) and the merge arithmetic; each subclass
only says how big its factors are, how its delta lies in the base weight's layout, and (for
quantized bases, see ``quantized.py``) how the base weight is read and written.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from . import fused
from .config import InitMode


class LoRALayer(nn.Module):
    """Shared state and merge logic of every LoRA layer kind.

    Attributes:
        base_layer: The wrapped, frozen module (kept addressable: ``x.base_layer.weight``).
        r: Rank of this layer's adapter.
        scaling: ``alpha / r`` (or ``alpha / sqrt(r)``), applied to the rank-r intermediate.
        merged: The delta is currently folded into ``base_layer``'s weight.
        disabled: The adapter path is skipped (``disable_adapter``).
    """

    #: Names of this layer's own parameters and submodules; what is adapter state.
    adapter_attribute_names: tuple[str, ...] = ()

    def __init__(self, base_layer: nn.Module, *, r: int, scaling: float) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.r = r
        self.scaling = scaling
        self.merged = False
        self.disabled = False
        self._original_weight: Any = None

    # --- subclass hooks ----------------------------------------------------------------------

    @staticmethod
    def adapter_shapes(base_layer: nn.Module, r: int) -> dict[str, tuple[int, ...]]:
        """Shapes of the adapter tensors this class creates for ``base_layer`` (keyed by name)."""
        raise NotImplementedError

    def delta_weight(self) -> torch.Tensor:
        """``scaling * B A`` in fp32, in the layout of ``base_layer.weight``."""
        raise NotImplementedError

    def reset_lora_parameters(self, init: InitMode) -> None:
        """(Re)initialise the factors; with ``True`` / ``"gaussian"`` one of them is zero."""
        raise NotImplementedError

    def read_base_weight(self) -> torch.Tensor:
        """The base weight as a dense fp32 tensor (quantized kinds dequantize here)."""
        return self.base_layer.weight.detach().float()

    def write_base_weight(self, new_weight: torch.Tensor) -> None:
        """Store a dense fp32 weight back into the base layer, in its own dtype."""
        weight = self.base_layer.weight
        weight.data.copy_(new_weight.to(weight.dtype))

    def snapshot_base_weight(self) -> Any:
        """A copy of the base weight that `restore_base_weight` puts back bit for bit."""
        return self.base_layer.weight.detach().clone()

    def restore_base_weight(self, snapshot: Any) -> None:
        """Put back what `snapshot_base_weight` returned."""
        self.base_layer.weight.data.copy_(snapshot)

    # --- merge ----------------------------------------------------------------------------------

    @torch.no_grad()
    def merge(self, keep_original: bool = True) -> None:
        """Fold the delta into the base weight. Idempotent; computed in fp32; refuses NaN/inf.

        Args:
            keep_original: Keep a copy of the base weight so `unmerge` restores it bit for bit
                (costs one copy of this weight). Without it, `unmerge` subtracts the delta,
                which is exact only up to floating point rounding.
        """
        if self.merged:
            return
        delta = self.delta_weight()
        snapshot = self.snapshot_base_weight() if keep_original else None
        self._add_to_base_weight(delta, "merge")
        self._original_weight = snapshot
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Take the delta back out of the base weight. Idempotent."""
        if not self.merged:
            return
        original = getattr(self, "_original_weight", None)
        if original is not None:
            self.restore_base_weight(original)
        else:
            self._add_to_base_weight(self.delta_weight().neg_(), "unmerge")
        self._original_weight = None
        self.merged = False

    def _add_to_base_weight(self, delta: torch.Tensor, action: str) -> None:
        """``W += delta`` with fp32 maths and one rounding into W's dtype; W unchanged on error.

        A dense base whose extremes prove the sum finite (``max|W| + max|delta|`` below the
        dtype's largest value; NaN fails the test) is updated in place: one pass, no merged
        copy. Anything else (quantized bases, sums near the dtype's limit) builds the merged
        weight in the base's own dtype first and checks *that*, so an fp16/bf16 overflow is
        refused rather than written as inf.
        """
        dense = type(self).write_base_weight is LoRALayer.write_base_weight
        weight = self.base_layer.weight
        if dense and _sum_is_finite(weight, delta):
            # Type promotion computes in fp32 and rounds once. For a 16-bit weight it also
            # allocates fp32 temporaries the size of the operand: row blocks of ~4M elements
            # bound them (fp32 weights need none; the blocks cost nothing there).
            rows = max(1, _ADD_BLOCK // max(1, weight[0].numel())) if weight.dim() > 1 else len(weight)
            for weight_rows, delta_rows in zip(weight.data.split(rows), delta.split(rows)):
                weight_rows.add_(delta_rows)
            return
        merged = self.read_base_weight() + delta
        self._check_finite(merged.to(weight.dtype) if dense else merged, action)
        self.write_base_weight(merged)

    def _check_finite(self, weight: torch.Tensor, action: str) -> None:
        if not all_finite(weight):
            name = getattr(self, "_hf_lora_path", type(self).__name__)
            raise ValueError(
                f"{action} of LoRA layer {name!r} would produce NaN or inf weights; the adapter "
                "holds non-finite values or overflows the base dtype. Nothing was changed."
            )

    def _adapter_input(self, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        # Adapters are kept in fp32 by default; cast the input once, here. Under autocast the
        # matmuls cast for themselves, so a copy would only cost memory.
        if x.dtype != dtype and not torch.is_autocast_enabled(x.device.type):
            return x.to(dtype)
        return x

    def __getattr__(self, name: str) -> Any:
        # transformers code reads ``get_input_embeddings().weight``, ``.in_features``,
        # ``.padding_idx``... on whatever sits at a layer's path: answer with the base layer's.
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_layer":
                raise
            return getattr(super().__getattr__("base_layer"), name)

    def extra_repr(self) -> str:
        return f"r={self.r}, scaling={self.scaling:g}, merged={self.merged}"


_ADD_BLOCK = 1 << 22  # elements per block of an in-place merge (16 MB of fp32 temporaries)


def _max_abs(t: torch.Tensor) -> float:
    # min/max propagate NaN and expose +-inf: one reduction, no bool copy (10x faster on CPU).
    low, high = torch.aminmax(t)
    return max(-float(low), float(high))


def all_finite(t: torch.Tensor) -> bool:
    """Whether every element of floating tensor ``t`` is finite (one reduction, no bool copy)."""
    return math.isfinite(_max_abs(t))


def _sum_is_finite(weight: torch.Tensor, delta: torch.Tensor) -> bool:
    """Whether ``weight + delta``, rounded to ``weight.dtype``, is certainly finite."""
    if weight.dtype not in (torch.float32, torch.float16, torch.bfloat16) or weight.shape != delta.shape:
        return False
    bound = _max_abs(weight) + _max_abs(delta)  # nan if either holds NaN: the test fails
    return bound < torch.finfo(weight.dtype).max * (1 - 2**-20)  # margin for fp32 rounding


def _make_dropout(p: float) -> nn.Module:
    return nn.Dropout(p) if p > 0 else nn.Identity()


def _factory_kwargs(weight: torch.Tensor) -> dict[str, Any]:
    # Adapters live on the base's device but always in fp32 (the adapter-dtype policy).
    return {"device": weight.device, "dtype": torch.float32}


class LoRALinear(LoRALayer):
    """LoRA on ``torch.nn.Linear`` (``weight`` is ``out x in``)."""

    adapter_attribute_names = ("lora_A", "lora_B")

    def __init__(
        self, base_layer: nn.Module, *, r: int, scaling: float, dropout: float, init: InitMode
    ) -> None:
        super().__init__(base_layer, r=r, scaling=scaling)
        shapes = self.adapter_shapes(base_layer, r)
        kwargs = _factory_kwargs(base_layer.weight)
        self.lora_dropout = _make_dropout(dropout)
        self.lora_A = nn.Linear(shapes["lora_A.weight"][1], r, bias=False, **kwargs)
        self.lora_B = nn.Linear(r, shapes["lora_B.weight"][0], bias=False, **kwargs)
        self.reset_lora_parameters(init)

    @staticmethod
    def features(base_layer: nn.Module) -> tuple[int, int]:
        """``(in_features, out_features)`` of the base layer."""
        return base_layer.in_features, base_layer.out_features

    @classmethod
    def adapter_shapes(cls, base_layer: nn.Module, r: int) -> dict[str, tuple[int, ...]]:
        in_features, out_features = cls.features(base_layer)
        return {"lora_A.weight": (r, in_features), "lora_B.weight": (out_features, r)}

    @torch.no_grad()
    def reset_lora_parameters(self, init: InitMode) -> None:
        if init == "gaussian":
            nn.init.normal_(self.lora_A.weight, std=1.0 / self.r)
        else:
            nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        if init is False:
            nn.init.kaiming_uniform_(self.lora_B.weight, a=math.sqrt(5))
        else:
            nn.init.zeros_(self.lora_B.weight)

    def delta_weight(self) -> torch.Tensor:
        return (self.lora_B.weight.float() @ self.lora_A.weight.float()) * self.scaling

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        # Same maths, less memory and time (see fused.py): base and adapter as one autograd
        # node where the base is a plain nn.Linear, else the adapter as one node on its output.
        if not (self.merged or self.disabled or args or kwargs) and fused.applies(self, x, None):
            return fused.adapter_update(self, x, None)
        result = self.base_layer(x, *args, **kwargs)
        if self.merged or self.disabled:
            return result
        if fused.applies(self, x, result):
            return fused.adapter_update(self, x, result)
        x = self._adapter_input(x, self.lora_A.weight.dtype)
        # The scaling multiplies the rank-r intermediate, not the full-width output.
        update = self.lora_B(self.lora_A(self.lora_dropout(x)) * self.scaling)
        return result + update.to(result.dtype)


class LoRAConv1D(LoRALinear):
    """LoRA on transformers' ``Conv1D`` (GPT-2), whose ``weight`` is ``in x out`` (fan-in/fan-out)."""

    @staticmethod
    def features(base_layer: nn.Module) -> tuple[int, int]:
        in_features, out_features = base_layer.weight.shape
        return int(in_features), int(out_features)

    def delta_weight(self) -> torch.Tensor:
        return super().delta_weight().T


class LoRAEmbedding(LoRALayer):
    """LoRA on ``torch.nn.Embedding``: a rank-r lookup table ``A`` (``r x vocab``) and ``B``.

    PEFT's layout: ``lora_embedding_A`` is ``r x num_embeddings``, ``lora_embedding_B`` is
    ``embedding_dim x r``; the delta ``(B A)^T`` has the embedding's ``vocab x dim`` shape.
    Dropout is not applied to token ids.
    """

    adapter_attribute_names = ("lora_embedding_A", "lora_embedding_B")

    def __init__(
        self, base_layer: nn.Module, *, r: int, scaling: float, dropout: float, init: InitMode
    ) -> None:
        super().__init__(base_layer, r=r, scaling=scaling)
        shapes = self.adapter_shapes(base_layer, r)
        kwargs = _factory_kwargs(base_layer.weight)
        self.lora_embedding_A = nn.Parameter(torch.empty(shapes["lora_embedding_A"], **kwargs))
        self.lora_embedding_B = nn.Parameter(torch.empty(shapes["lora_embedding_B"], **kwargs))
        self.reset_lora_parameters(init)

    @staticmethod
    def adapter_shapes(base_layer: nn.Module, r: int) -> dict[str, tuple[int, ...]]:
        return {
            "lora_embedding_A": (r, base_layer.num_embeddings),
            "lora_embedding_B": (base_layer.embedding_dim, r),
        }

    @torch.no_grad()
    def reset_lora_parameters(self, init: InitMode) -> None:
        # Zero A and normal B, as PEFT does for embeddings: a fresh adapter is the identity.
        if init is False:
            nn.init.normal_(self.lora_embedding_A)
        else:
            nn.init.zeros_(self.lora_embedding_A)
        nn.init.normal_(self.lora_embedding_B)

    def delta_weight(self) -> torch.Tensor:
        return (self.lora_embedding_B.float() @ self.lora_embedding_A.float()).T * self.scaling

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        if self.merged or self.disabled:
            return result
        base = self.base_layer
        rows = F.embedding(
            x,
            self.lora_embedding_A.T,
            padding_idx=base.padding_idx,
            scale_grad_by_freq=base.scale_grad_by_freq,
            sparse=base.sparse,
        )
        update = (rows * self.scaling) @ self.lora_embedding_B.T
        embed_scale = getattr(base, "embed_scale", None)
        if embed_scale is not None:
            # Scaled embeddings (Gemma 3) multiply inside forward: so must the delta, or the
            # unmerged output would differ from the merged one (and from PEFT's).
            update = update * (embed_scale.to(update.dtype) if torch.is_tensor(embed_scale) else embed_scale)
        return result + update.to(result.dtype)


class TrainedCopy(nn.Module):
    """A module from ``modules_to_save``: trained in full, the original kept frozen beside it.

    The copy is what runs and what is saved (under the original module's key, PEFT's layout);
    the original serves ``disable_adapter``. Attribute reads fall through to the copy so code
    that inspects, say, ``lm_head.weight`` keeps working.
    """

    def __init__(self, original_module: nn.Module) -> None:
        super().__init__()
        import copy

        self.original_module = original_module
        self.trained_module = copy.deepcopy(original_module)
        self.disabled = False

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        module = self.original_module if self.disabled else self.trained_module
        return module(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("trained_module"), name)
