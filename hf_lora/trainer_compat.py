"""What the stock ``transformers.Trainer`` reads from a model, answered for `LoRAModelWrapper`.

See ``shared/research/trainer_integration.md`` and ``docs/trainer.md``: Trainer names the model
class for label smoothing, casts it with ``to``, enables activation checkpointing on it, writes
``state_dict()`` into checkpoints and resumes through ``load_state_dict(sd, False)``. This mixin
keeps those answers in one place; the wrapper's own file stays about injection and adapters.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from torch.nn.modules.module import _IncompatibleKeys


class TrainerCompatMixin:
    """Trainer-facing methods of `LoRAModelWrapper` (needs ``base_model`` and ``adapter_parameters``)."""

    base_model: nn.Module
    adapter_parameters: Any  # the wrapper's method: the one definition of adapter state

    def _get_name(self) -> str:
        # Trainer's label smoothing decides label shifting from this name.
        return self.base_model._get_name()

    def to(self, *args: Any, **kwargs: Any) -> Any:
        """``nn.Module.to``, refusing dtype casts of a bitsandbytes base (they would corrupt it)."""
        _, dtype, *_ = torch._C._nn._parse_to(*args, **kwargs)
        if dtype is not None and getattr(self.base_model, "is_quantized", False):
            raise ValueError(
                f"Cannot cast a quantized base model to {dtype}; the adapters already compute in "
                "fp32 and mixed precision is set through TrainingArguments (bf16/fp16)."
            )
        return super().to(*args, **kwargs)

    # nn.Module's dtype shortcuts bypass to(); route them through it so the guard applies.
    def half(self) -> Any:
        """``to(torch.float16)``; refused for a quantized base."""
        return self.to(torch.float16)

    def bfloat16(self) -> Any:
        """``to(torch.bfloat16)``; refused for a quantized base."""
        return self.to(torch.bfloat16)

    def float(self) -> Any:
        """``to(torch.float32)``; refused for a quantized base."""
        return self.to(torch.float32)

    def double(self) -> Any:
        """``to(torch.float64)``; refused for a quantized base."""
        return self.to(torch.float64)

    def activation_checkpointing_enable(self, *args: Any, **kwargs: Any) -> None:
        """Enable the base's activation checkpointing and make its inputs require grad.

        With a frozen embedding, reentrant checkpointing would otherwise see inputs without
        grad and silently train nothing.
        """
        enable = getattr(self.base_model, "activation_checkpointing_enable", None)
        if enable is None:
            enable = self.base_model.gradient_checkpointing_enable
        enable(*args, **kwargs)
        self._enable_input_grads_once()

    def gradient_checkpointing_enable(self, *args: Any, **kwargs: Any) -> None:
        """Deprecated transformers alias of `activation_checkpointing_enable`."""
        enable = self.base_model.gradient_checkpointing_enable
        enable(*args, **kwargs)
        self._enable_input_grads_once()

    def _enable_input_grads_once(self) -> None:
        # The base's own enable often installs the hook already; a second call would replace
        # the stored handle and leave an orphan hook that disable_input_require_grads() misses.
        if not getattr(self.base_model, "_require_grads_hooks", None):
            self.base_model.enable_input_require_grads()

    def state_dict(self, *args: Any, destination: Any = None, prefix: str = "", keep_vars: bool = False) -> Any:
        """Adapter tensors only (keys ``base_model.<path>``); what Trainer writes to checkpoints.

        Collected from the adapter parameters directly: walking the base would run quantized
        layers' state-dict hooks, which on some CPUs alter bitsandbytes 4-bit weights.
        """
        if args:  # legacy positional (destination, prefix, keep_vars)
            destination, prefix, keep_vars = (list(args) + [destination, prefix, keep_vars][len(args):])[:3]
        out = destination if destination is not None else OrderedDict()
        for path, param in self.adapter_parameters().items():
            out[f"{prefix}base_model.{path}"] = param if keep_vars else param.detach()
        return out

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False) -> _IncompatibleKeys:
        """Load adapter tensors written by `state_dict`; missing keys are reported among adapter keys only."""
        expected = {f"base_model.{p}": param for p, param in self.adapter_parameters().items()}
        missing = [k for k in expected if k not in state_dict]
        unexpected = [k for k in state_dict if k not in expected]
        if strict and (missing or unexpected):
            raise RuntimeError(f"Adapter state mismatch: missing keys {missing[:5]}, unexpected keys {unexpected[:5]}.")
        for key, param in expected.items():
            if key in state_dict and tuple(state_dict[key].shape) != tuple(param.shape):
                raise RuntimeError(
                    f"Adapter tensor {key!r} has shape {tuple(state_dict[key].shape)}, model expects {tuple(param.shape)}."
                )
        with torch.no_grad():
            for key, param in expected.items():
                if key in state_dict:
                    param.copy_(state_dict[key])
        return _IncompatibleKeys(missing, unexpected)

    def create_or_update_model_card(self, output_dir: str) -> None:
        """Rewrite ``output_dir/README.md`` as hf_lora's adapter card (called by ``Trainer.push_to_hub``).

        Trainer calls this after writing its own card when the folder's previous card said
        ``library_name: peft`` (``LoRACallback`` writes one in ``on_push_begin``). Trainer's tags
        and its "Training procedure" section are kept; the front matter becomes ours.
        """
        from .hub import rewrite_trainer_card

        rewrite_trainer_card(self, output_dir, metrics=self.__dict__.get("_hf_lora_card_metrics"))
