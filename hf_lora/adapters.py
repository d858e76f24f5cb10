"""Many adapters on one base: load, switch in place, delete and save them (PEFT's folder layout).

LoRA's deployment promise is that one frozen base serves many tasks by swapping only ``A`` and
``B``. Here switching copies the next adapter's factors into the *existing* LoRA layers: no
module is created or replaced, the parameter objects stay the same (an optimizer or a
``torch.compile`` graph keeps pointing at them), and a switch costs about one copy of the
adapter's bytes out and one in.

* The layers hold the *active* adapter. Every other adapter lives in an `AdapterBank` kept in
  the wrapper's ``__dict__``: outside the module tree, so not in ``state_dict``,
  ``parameters()`` or ``.to()``. Its tensors stay on the device the layers had at load time.
* Adapters of different ranks share the layers by zero padding: a layer's parameters have the
  largest rank loaded so far (extra rows of ``A`` and columns of ``B`` are zero, which adds
  nothing to ``B A``, and training keeps them zero because their gradients are zero). The
  layer's ``r`` is the active adapter's rank; saving trims the padding (`logical_adapter_state`).
  Growing happens when a larger adapter is *loaded*, never when switching.
* The adapter the wrapper was built with is named ``"default"``. Saving with several adapters
  uses PEFT's layout: ``"default"`` in the folder itself, every other adapter in a subfolder
  named after it.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .config import LoRAConfig
from .layers import LoRALayer
from .safe_io import safe_join
from .state import lora_layers, peft_key

if TYPE_CHECKING:
    from .model import LoRAModelWrapper

DEFAULT_ADAPTER = "default"
# Config fields adapters sharing one set of LoRA layers may disagree on. Everything else (bias,
# modules_to_save, variant switches) changes which tensors exist or how they are used.
_SWITCHABLE_FIELDS = frozenset({
    "r", "lora_alpha", "lora_dropout", "target_modules", "exclude_modules", "use_rslora",
    "init_lora_weights", "rank_pattern", "alpha_pattern", "fan_in_fan_out", "task_type",
})
_FILE_NAMES = frozenset({"adapter_config.json", "adapter_model.safetensors", "adapter_model.bin", "README.md"})


@dataclass
class StoredAdapter:
    """One adapter's state, outside the module tree.

    Attributes:
        config: Its `LoRAConfig`.
        tensors: Adapter-parameter path -> tensor at the adapter's own rank (no padding). For
            the active adapter these are stale buffers: the layers hold the live values.
        ranks: LoRA-layer path -> rank.
        scalings: LoRA-layer path -> scaling.
    """

    config: LoRAConfig
    tensors: dict[str, torch.Tensor]
    ranks: dict[str, int]
    scalings: dict[str, float]


@dataclass
class AdapterBank:
    """Every adapter of a wrapper, in load order, and which one the layers hold.

    ``slots`` and ``layers`` cache the module walk (the LoRA layers and their parameter objects
    never change identity after wrapping), so a switch costs copies, not a tree traversal.
    """

    active: str
    entries: dict[str, StoredAdapter]
    slots: dict[str, tuple[nn.Parameter, _Slot | None]]
    layers: list[tuple[str, LoRALayer]]


@dataclass(frozen=True)
class _Slot:
    """Where an adapter parameter sits: its LoRA layer and the dimension that is the rank."""

    layer_path: str
    layer: LoRALayer
    rank_dim: int | None  # 0 for A (r x in), 1 for B (out x r), None for other adapter state


def check_adapter_name(name: object) -> str:
    """Validate an adapter name; it becomes a folder name when saving.

    Raises:
        ValueError: Not a non-empty string, a path (``/``, ``\\``, ``.``, ``..``), a control
            character, or the name of an adapter file.
    """
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"adapter name {name!r} is invalid: expected a non-empty string such as 'summarize'.")
    if "/" in name or "\\" in name or name in (".", "..") or (os.sep in name) or any(ord(c) < 32 for c in name):
        raise ValueError(f"adapter name {name!r} is invalid: it becomes a folder name, so no path separators, "
                         "'.', '..' or control characters.")
    if name in _FILE_NAMES:
        raise ValueError(f"adapter name {name!r} is invalid: it is the name of an adapter file.")
    return name


def _slots(wrapper: LoRAModelWrapper) -> dict[str, tuple[nn.Parameter, _Slot | None]]:
    found = wrapper.__dict__.get("_adapter_bank")
    return found.slots if found is not None else _walk_slots(wrapper)


def _walk_slots(wrapper: LoRAModelWrapper) -> dict[str, tuple[nn.Parameter, _Slot | None]]:
    owners: dict[str, _Slot] = {}
    for path, layer in lora_layers(wrapper.base_model):
        for index, attribute in enumerate(layer.adapter_attribute_names):
            owner = getattr(layer, attribute)
            names = [""] if isinstance(owner, nn.Parameter) else [n for n, _ in owner.named_parameters()]
            for name in names:
                key = ".".join(p for p in (path, attribute, name) if p)
                owners[key] = _Slot(path, layer, index if index < 2 else None)
    return {path: (param, owners.get(path)) for path, param in wrapper.adapter_parameters().items()}


def logical_adapter_state(wrapper: LoRAModelWrapper) -> dict[str, torch.Tensor]:
    """The active adapter's parameters (views), with any zero padding beyond its rank trimmed.

    Without padding this is ``wrapper.adapter_parameters()``; saving always goes through it.
    """
    out = {}
    for path, (param, slot) in _slots(wrapper).items():
        if slot is not None and slot.rank_dim is not None and param.shape[slot.rank_dim] != slot.layer.r:
            out[path] = param.narrow(slot.rank_dim, 0, slot.layer.r)
        else:
            out[path] = param
    return out


def _capture(wrapper: LoRAModelWrapper, layers: list[tuple[str, LoRALayer]]) -> StoredAdapter:
    return StoredAdapter(
        config=wrapper.lora_config,
        tensors={p: t.detach().clone() for p, t in logical_adapter_state(wrapper).items()},
        ranks={path: layer.r for path, layer in layers},
        scalings={path: layer.scaling for path, layer in layers},
    )


def bank(wrapper: LoRAModelWrapper) -> AdapterBank:
    """The wrapper's `AdapterBank`, created on first use with its own adapter as ``"default"``."""
    found = wrapper.__dict__.get("_adapter_bank")
    if found is None:
        wrapper._check_not_unloaded()
        layers = lora_layers(wrapper.base_model)
        found = AdapterBank(DEFAULT_ADAPTER, {DEFAULT_ADAPTER: _capture(wrapper, layers)}, _walk_slots(wrapper), layers)
        wrapper.__dict__["_adapter_bank"] = found
    return found


def adapter_configs(wrapper: LoRAModelWrapper) -> dict[str, LoRAConfig]:
    """Adapter name -> config, in load order (``{"default": ...}`` for a single adapter)."""
    found = wrapper.__dict__.get("_adapter_bank")
    if found is None:
        return {DEFAULT_ADAPTER: wrapper.lora_config}
    return {name: entry.config for name, entry in found.entries.items()}


def active_adapter(wrapper: LoRAModelWrapper) -> str:
    """Name of the adapter the layers currently hold."""
    found = wrapper.__dict__.get("_adapter_bank")
    return DEFAULT_ADAPTER if found is None else found.active


@torch.no_grad()
def _grow(wrapper: LoRAModelWrapper, ranks: dict[str, int]) -> None:
    """Zero-pad layers whose physical rank is below ``ranks`` (same parameter objects, new storage)."""
    for path, (param, slot) in _slots(wrapper).items():
        if slot is None or slot.rank_dim is None or param.shape[slot.rank_dim] >= ranks[slot.layer_path]:
            continue
        shape = list(param.shape)
        shape[slot.rank_dim] = ranks[slot.layer_path]
        grown = param.new_zeros(shape)
        grown.narrow(slot.rank_dim, 0, param.shape[slot.rank_dim]).copy_(param)
        param.data = grown
        owner = wrapper.base_model.get_submodule(path.rsplit(".", 1)[0])
        if isinstance(owner, nn.Linear):  # keep lora_A.out_features / lora_B.in_features truthful
            owner.out_features, owner.in_features = owner.weight.shape


def _check_compatible(current: LoRAConfig, new: LoRAConfig, source: str) -> None:
    for f in fields(LoRAConfig):
        if f.name not in _SWITCHABLE_FIELDS and getattr(current, f.name) != getattr(new, f.name):
            raise ValueError(
                f"{source}: {f.name}={getattr(new, f.name)!r} differs from the loaded adapters' "
                f"{getattr(current, f.name)!r}; adapters that share one set of LoRA layers must agree on it."
            )


def register(wrapper: LoRAModelWrapper, name: str, stored: StoredAdapter, source: str) -> None:
    """Add ``stored`` under ``name`` (inactive), after checking it fits the wrapper's layers."""
    found = bank(wrapper)
    check_adapter_name(name)
    if name in found.entries:
        raise ValueError(f"An adapter named {name!r} is already loaded; delete_adapter({name!r}) first or pick another name.")
    _check_compatible(found.entries[found.active].config, stored.config, source)
    slots = _slots(wrapper)
    missing = sorted(set(slots) - set(stored.tensors))
    unexpected = sorted(set(stored.tensors) - set(slots))
    if missing or unexpected:
        raise ValueError(f"{source}: the adapter does not cover the same layers as the loaded ones: "
                         f"missing {missing[:3]}, unexpected {unexpected[:3]}.")
    for path, (param, slot) in slots.items():
        expected = list(param.shape)
        if slot is not None and slot.rank_dim is not None:
            expected[slot.rank_dim] = stored.ranks[slot.layer_path]
        if list(stored.tensors[path].shape) != expected:
            raise ValueError(f"{source}: tensor {peft_key(path)!r} has shape {tuple(stored.tensors[path].shape)}, "
                             f"expected {tuple(expected)}.")
        stored.tensors[path] = stored.tensors[path].to(device=param.device, dtype=param.dtype)
    _grow(wrapper, stored.ranks)
    found.entries[name] = stored


@torch.no_grad()
def _sync_active(wrapper: LoRAModelWrapper, found: AdapterBank) -> None:
    """Copy the live (possibly trained) values of the active adapter into its stored buffers."""
    entry = found.entries[found.active]
    live = logical_adapter_state(wrapper)
    _copy_all([entry.tensors[path] for path in live], list(live.values()))


def _copy_all(targets: list[torch.Tensor], sources: list[torch.Tensor]) -> None:
    # One fused call instead of a Python loop of copies: switching then costs about the bytes.
    if targets and all(t.device == s.device and t.dtype == s.dtype for t, s in zip(targets, sources)):
        torch._foreach_copy_(targets, sources)
    else:
        for target, source in zip(targets, sources):
            target.copy_(source)


def _check_known(found: AdapterBank, name: str) -> None:
    if name not in found.entries:
        raise ValueError(f"No adapter named {name!r}; loaded adapters: {list(found.entries)}.")


@torch.no_grad()
def set_adapter(wrapper: LoRAModelWrapper, name: str) -> None:
    """Make ``name`` the active adapter by copying its factors into the LoRA layers in place."""
    found = bank(wrapper)
    _check_known(found, name)
    if name == found.active:
        return
    merged = [layer for _, layer in found.layers if layer.merged]
    for layer in merged:
        layer.unmerge()
    _sync_active(wrapper, found)
    entry = found.entries[name]
    targets, sources = [], []
    for path, (param, slot) in _slots(wrapper).items():
        source = entry.tensors[path]
        if slot is not None and slot.rank_dim is not None and source.shape[slot.rank_dim] != param.shape[slot.rank_dim]:
            param.narrow(slot.rank_dim, source.shape[slot.rank_dim], param.shape[slot.rank_dim] - source.shape[slot.rank_dim]).zero_()
            targets.append(param.narrow(slot.rank_dim, 0, source.shape[slot.rank_dim]))
        else:
            targets.append(param)
        sources.append(source)
    _copy_all(targets, sources)
    for path, layer in found.layers:
        layer.r, layer.scaling = entry.ranks[path], entry.scalings[path]
    wrapper.lora_config = entry.config
    found.active = name
    for layer in merged:
        layer.merge()


def delete_adapter(wrapper: LoRAModelWrapper, name: str) -> None:
    """Forget an inactive adapter (the layers keep their padded size)."""
    found = bank(wrapper)
    _check_known(found, name)
    if name == found.active:
        others = [n for n in found.entries if n != name]
        hint = f"set_adapter({others[0]!r}) first" if others else "it is the only adapter"
        raise ValueError(f"Cannot delete the active adapter {name!r}: {hint}.")
    del found.entries[name]


@contextmanager
def use_adapter(wrapper: LoRAModelWrapper, name: str) -> Iterator[None]:
    """Run with ``name`` active, then switch back to the previous adapter."""
    previous = active_adapter(wrapper)
    set_adapter(wrapper, name)
    try:
        yield
    finally:
        set_adapter(wrapper, previous)


def load_adapter(
    wrapper: LoRAModelWrapper, model_id: str, name: str, *, revision: str | None = None,
    token: str | None = None, subfolder: str | None = None, strict_base: bool = False,
) -> None:
    """Read an adapter folder or Hub repo (ours or PEFT's) and register it under ``name``, inactive."""
    from .checkpoint import (
        CONFIG_NAME,
        check_same_save,
        check_tensor_values,
        read_config,
        read_tensors,
        resolve_adapter_folder,
        weights_path,
    )
    from .fingerprint import check_base, recorded_fingerprint
    from .init import modifies_base, without_base_init

    check_adapter_name(name)
    found = bank(wrapper)
    if any(modifies_base(entry.config.init_lora_weights) for entry in found.entries.values()):
        raise ValueError("This model's base holds a PiSSA/OLoRA residual, not the original weights; other "
                         "adapters were trained on the original base. Save with save_as_lora and wrap the original base.")
    folder = resolve_adapter_folder(model_id, revision=revision, token=token, subfolder=subfolder)
    config = without_base_init(read_config(folder))
    by_key = {peft_key(path): path for path in _slots(wrapper)}
    tensors = {by_key.get(key, key): tensor for key, tensor in read_tensors(folder).items()}
    check_tensor_values(tensors, str(weights_path(folder)))
    check_same_save(folder)
    _check_compatible(found.entries[found.active].config, config, str(folder / CONFIG_NAME))  # errors name the file
    check_base(recorded_fingerprint(folder / CONFIG_NAME), wrapper, strict=strict_base, source=str(folder))
    layer_paths = [path for path, _ in lora_layers(wrapper.base_model)]
    stored = StoredAdapter(config, tensors, {p: config.rank_for(p) for p in layer_paths},
                           {p: config.scaling_for(p) for p in layer_paths})
    register(wrapper, name, stored, str(weights_path(folder)))


def save_adapters(wrapper: LoRAModelWrapper, directory: str | os.PathLike[str],
                  selected: Sequence[str] | None = None, **card_fields: Any) -> list[Path]:
    """Save adapters in PEFT's layout: ``"default"`` in ``directory``, others in ``directory/<name>``.

    Each adapter is briefly made active so the one code path that writes adapter folders
    (`hf_lora.checkpoint.save_adapter`) writes it; the active adapter is restored after.
    Returns the folders written.
    """
    from .checkpoint import save_adapter

    found = bank(wrapper)
    names = list(found.entries) if selected is None else list(selected)
    for name in names:
        _check_known(found, name)
    written = []
    for name in names:
        # safe_join: a symlink named like the adapter must not send the files outside `directory`.
        folder = Path(directory) if name == DEFAULT_ADAPTER else safe_join(directory, check_adapter_name(name), what="adapter name")
        with use_adapter(wrapper, name):
            written.append(save_adapter(wrapper, folder, **card_fields))
    return written
