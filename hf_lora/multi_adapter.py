"""The multi-adapter methods of `LoRAModelWrapper` (PEFT's names); the work is in ``adapters.py``.

    model = LoRAModelWrapper.from_pretrained(base, "runs/summarize")   # adapter "default"
    model.load_adapter("runs/translate", "translate")
    model.set_adapter("translate")                  # copies A and B in place
    with model.use_adapter("default"):
        ...
    model.add_weighted_adapter(["default", "translate"], [0.5, 0.5], "both", method="svd")
    model.save_pretrained("out")                    # out/ (default), out/translate, out/both
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from . import adapters as _adapters
from .config import LoRAConfig


class MultiAdapterMixin:
    """Load, switch, combine and delete adapters that share one base and one set of LoRA layers."""

    @property
    def adapters(self) -> dict[str, LoRAConfig]:
        """Adapter name -> `LoRAConfig`, in load order; the wrapper's own adapter is ``"default"``."""
        return _adapters.adapter_configs(self)  # type: ignore[arg-type]

    @property
    def active_adapter(self) -> str:
        """Name of the adapter the LoRA layers hold (what runs, trains, and what ``state_dict`` holds)."""
        return _adapters.active_adapter(self)  # type: ignore[arg-type]

    def load_adapter(self, model_id: str, adapter_name: str, *, revision: str | None = None, token: str | None = None,
                     subfolder: str | None = None, strict_base: bool = False) -> None:
        """Load an adapter folder or Hub repo (ours or PEFT's) under ``adapter_name``, without activating it.

        It must adapt the same layers (any rank and alpha; a larger rank zero-pads the layers
        once, here) and agree on ``bias`` and ``modules_to_save``.

        Raises:
            ValueError: Invalid or taken name, different layers, incompatible config, or
                (``strict_base``) a different base model.
        """
        _adapters.load_adapter(self, model_id, adapter_name, revision=revision, token=token,  # type: ignore[arg-type]
                               subfolder=subfolder, strict_base=strict_base)

    def set_adapter(self, adapter_name: str) -> None:
        """Activate ``adapter_name``: copy its factors into the existing layers (a merged model stays merged)."""
        _adapters.set_adapter(self, adapter_name)  # type: ignore[arg-type]

    def delete_adapter(self, adapter_name: str) -> None:
        """Forget an inactive adapter. Raises ``ValueError`` for the active one."""
        _adapters.delete_adapter(self, adapter_name)  # type: ignore[arg-type]

    @contextmanager
    def use_adapter(self, adapter_name: str) -> Iterator[None]:
        """``with model.use_adapter(name):`` runs with ``name`` active, then restores the previous one."""
        with _adapters.use_adapter(self, adapter_name):  # type: ignore[arg-type]
            yield

    def add_weighted_adapter(self, adapters: Sequence[str], weights: Sequence[float], adapter_name: str,
                             method: str = "cat", rank: int | None = None) -> None:
        """Register ``adapter_name`` = ``sum_i weights[i] * delta(adapters[i])`` (``"cat"``: exact,
        rank = sum of ranks; ``"svd"``: best rank-``rank`` approximation). See ``hf_lora.combine``."""
        from .combine import add_weighted_adapter

        add_weighted_adapter(self, adapters, weights, adapter_name, method, rank)  # type: ignore[arg-type]

    def save_adapters(self, save_directory: str, selected_adapters: Sequence[str] | None = None, **card_fields: object) -> None:
        """Save adapters in PEFT's layout: ``"default"`` in the folder, the others in subfolders by name."""
        _adapters.save_adapters(self, save_directory, selected_adapters, **card_fields)  # type: ignore[arg-type]
