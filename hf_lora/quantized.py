"""LoRA over bitsandbytes 4-bit and 8-bit linear layers (QLoRA).

The forward is `LoRALinear`'s: the quantized base computes its own output and the fp32 adapter
adds to it. Only reading and writing the base weight differ: merging dequantizes, adds the
delta in fp32 and requantizes, which rounds (a warning says so). The original quantized
tensors are always kept while merged (they are small), so `unmerge` restores the base bit for
bit instead of subtracting from an already rounded weight.

bitsandbytes is imported lazily: these classes are only built for models that already hold
bitsandbytes layers, which implies the package is importable.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn

from .layers import LoRALinear

_ROUNDING_WARNING = (
    "Merging LoRA into a {bits}-bit base requantizes the merged weight, which rounds it: outputs "
    "will differ slightly from the unmerged model. For deployment, merge into a 16-bit copy of "
    "the base instead (`hf-lora merge`)."
)


_REPACKED_WARNING = (
    "bitsandbytes had already repacked {count} 4-bit layer(s) for CPU inference before wrap (an eval "
    "forward of the unwrapped model on a CPU with AVX512-BF16), which rounds their absmax to bf16. "
    "hf_lora restored the standard layout; load the base again for bit-exact weights."
)


def keep_cpu_4bit_weights_fixed(model: nn.Module) -> int:
    """Stop bitsandbytes from repacking any 4-bit layer of ``model`` for CPU inference.

    On CPUs with AVX512-BF16, ``Linear4bit.forward`` in eval mode without grad converts its
    weight to a CPU-specific layout and rounds ``absmax`` to bf16; ``state_dict`` converts it
    back. The frozen base must stay bit-identical through wrap, train, eval, save and merge,
    and merging must be able to dequantize the standard layout, so every 4-bit layer (adapted
    or not) gets ``support_avx512bf16_for_cpu = False``. A layer that was already repacked is
    converted back (its rounding cannot be undone) with a warning. Returns how many were.
    """
    repacked = 0
    for module in model.modules():
        if not hasattr(module, "support_avx512bf16_for_cpu"):
            continue
        module.support_avx512bf16_for_cpu = False
        weight = getattr(module, "weight", None)
        state = getattr(weight, "quant_state", None)
        if getattr(state, "packing_format_for_cpu", False):
            # Private, but it is what bitsandbytes itself calls before moving such a weight.
            from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

            weight.data, weight.quant_state = _convert_weight_packed_for_cpu_inverse(weight.data, state)
            repacked += 1
    if repacked:
        warnings.warn(_REPACKED_WARNING.format(count=repacked), UserWarning, stacklevel=3)
    return repacked


class LoRALinear4bit(LoRALinear):
    """LoRA on ``bitsandbytes.nn.Linear4bit`` (NF4 / FP4, QLoRA)."""

    def __init__(self, base_layer: nn.Module, **kwargs: Any) -> None:
        super().__init__(base_layer, **kwargs)
        # On CPUs with AVX512-BF16, bnb repacks 4-bit weights during eval forwards and the
        # inverse conversion (run by state_dict) rounds absmax to bf16, silently changing the
        # frozen base. A frozen base must stay bit-identical, so the repacking is switched off.
        if hasattr(base_layer, "support_avx512bf16_for_cpu"):
            base_layer.support_avx512bf16_for_cpu = False

    def merge(self, keep_original: bool = True) -> None:
        super().merge(keep_original=True)  # requantized weights cannot be un-rounded

    def read_base_weight(self) -> torch.Tensor:
        import bitsandbytes.functional as bnbF

        weight = self.base_layer.weight
        return bnbF.dequantize_4bit(weight.data, weight.quant_state).float()

    def write_base_weight(self, new_weight: torch.Tensor) -> None:
        import bitsandbytes as bnb

        warnings.warn(_ROUNDING_WARNING.format(bits=4), UserWarning, stacklevel=3)
        old = self.base_layer.weight
        self.base_layer.weight = bnb.nn.Params4bit(
            new_weight.to(old.quant_state.dtype).cpu(),
            requires_grad=False,
            blocksize=old.blocksize,
            compress_statistics=old.compress_statistics,
            quant_type=old.quant_type,
            quant_storage=old.quant_storage,
            module=self.base_layer,
        ).to(old.device)

    def snapshot_base_weight(self) -> Any:
        return self.base_layer.weight  # replaced, never mutated, by write_base_weight

    def restore_base_weight(self, snapshot: Any) -> None:
        self.base_layer.weight = snapshot
        self.base_layer.quant_state = snapshot.quant_state  # Params4bit set it to the merged one


class LoRALinear8bit(LoRALinear):
    """LoRA on ``bitsandbytes.nn.Linear8bitLt`` (LLM.int8)."""

    def merge(self, keep_original: bool = True) -> None:
        super().merge(keep_original=True)

    def _scales(self) -> torch.Tensor:
        # Row scales live on the weight until the first forward, which moves them to the state.
        weight = self.base_layer.weight
        return weight.SCB if weight.SCB is not None else self.base_layer.state.SCB

    def read_base_weight(self) -> torch.Tensor:
        return self.base_layer.weight.data.float() * (self._scales().float().unsqueeze(1) / 127.0)

    def write_base_weight(self, new_weight: torch.Tensor) -> None:
        import bitsandbytes.functional as bnbF

        warnings.warn(_ROUNDING_WARNING.format(bits=8), UserWarning, stacklevel=3)
        device = self.base_layer.weight.device
        codes, scales, _ = bnbF.int8_vectorwise_quant(new_weight.to(device=device, dtype=torch.float16))
        self._set_int8(codes, scales)

    def snapshot_base_weight(self) -> Any:
        return self.base_layer.weight.data.clone(), self._scales().clone()

    def restore_base_weight(self, snapshot: Any) -> None:
        self._set_int8(*snapshot)

    def _set_int8(self, codes: torch.Tensor, scales: torch.Tensor) -> None:
        weight = self.base_layer.weight
        weight.data = codes
        weight.CB = codes
        weight.SCB = scales
        state = getattr(self.base_layer, "state", None)
        if state is not None:
            state.CB, state.SCB = codes, scales
