"""Base-model fingerprints: notice when an adapter is loaded onto a base it was not trained on.

An adapter only means something on top of the exact weights it was trained against; loaded onto
another checkpoint of the same architecture, every shape matches and it silently computes
nonsense. ``save_pretrained`` therefore records, under the ``hf_lora_base`` key of
``adapter_config.json``, a cheap description of the base:

* its name or path and revision (when the base exposes one);
* the shape of each targeted weight, per module name (``q_proj: [[64, 64]]``);
* for a few targeted layers spread over the depth: a SHA-256 of a fixed sample of the weight's
  raw storage bytes (for bitsandbytes bases, the quantized bytes) and a *sign sketch*, the signs
  of a fixed sample of the dense weight.

The hash decides when both bases store weights the same way. Across storage kinds (an adapter
trained with QLoRA on a 4-bit base, loaded onto the bf16 base for merging) the bytes cannot
agree, but signs survive casting and quantization except for the few weights rounded to zero,
so the sketches of the same base agree on well over 80% of positions, and those of unrelated
bases on about 50%.

PEFT ignores the key when it loads the folder (it drops unknown config keys with a warning).
"""

from __future__ import annotations

import hashlib
import os
import warnings
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch

from .state import lora_layers

if TYPE_CHECKING:
    from .layers import LoRALayer
    from .model import LoRAModelWrapper

FINGERPRINT_KEY = "hf_lora_base"
FORMAT_VERSION = 1
SAMPLED_LAYERS = 4
SIGN_SAMPLES = 256
BYTE_SAMPLES = 1024
# Same base across storage kinds agrees on ~90-100% of signs; unrelated bases on ~50% (+-3%).
SIGN_AGREEMENT_THRESHOLD = 0.8


class BaseMismatchWarning(UserWarning):
    """An adapter is being loaded onto a base model other than the one it was saved with."""


def _base_id(wrapper: LoRAModelWrapper) -> tuple[str | None, str | None]:
    config = getattr(wrapper.base_model, "config", None)
    name = getattr(config, "_name_or_path", None) or getattr(wrapper.base_model, "name_or_path", None) or None
    revision = getattr(config, "_commit_hash", None) or None
    return name, revision


def _storage_kind(weight: torch.Tensor) -> str:
    kind = type(weight).__name__
    if kind == "Params4bit":
        return f"bnb-4bit-{weight.quant_type}"
    if kind == "Int8Params":
        return "bnb-8bit"
    return str(weight.dtype).removeprefix("torch.")


def _logical_shape(weight: torch.Tensor) -> list[int]:
    quant_state = getattr(weight, "quant_state", None)
    shape = quant_state.shape if quant_state is not None and hasattr(quant_state, "shape") else weight.shape
    return [int(s) for s in shape]


def _positions(numel: int, count: int) -> torch.Tensor:
    # Fixed, evenly spaced positions: the same for every base of the same shape.
    return torch.linspace(0, numel - 1, min(count, numel)).round().long()


def _sign_sketch(dense: torch.Tensor) -> str:
    flat = dense.reshape(-1)
    bits = (flat[_positions(flat.numel(), SIGN_SAMPLES)] > 0).tolist()
    value = sum(1 << i for i, bit in enumerate(bits) if bit)
    return f"{len(bits)}:{value:x}"


def _byte_hash(weight: torch.Tensor) -> str:
    flat = weight.detach().reshape(-1)
    sample = flat[_positions(flat.numel(), BYTE_SAMPLES).to(flat.device)].cpu().contiguous()
    return hashlib.sha256(sample.view(torch.uint8).numpy().tobytes()).hexdigest()[:16]


@torch.no_grad()
def _layer_entry(layer: LoRALayer) -> dict[str, Any]:
    weight = layer.base_layer.weight
    dense = layer.read_base_weight()
    if layer.merged:  # fingerprint the base, not base + delta; the raw bytes are not the base's
        dense = dense - layer.delta_weight()
        raw = None
    else:
        raw = _byte_hash(weight)
    return {"storage": _storage_kind(weight), "sha256": raw, "signs": _sign_sketch(dense.cpu())}


def base_fingerprint(wrapper: LoRAModelWrapper) -> dict[str, Any]:
    """Describe the base under ``wrapper``'s LoRA layers (see the module docstring).

    Args:
        wrapper: A wrapped model; only the base weights of its LoRA layers are read.

    Returns:
        A JSON-ready dict; `compare_fingerprints` compares two of them.
    """
    layers = lora_layers(wrapper.base_model)
    shapes: dict[str, list[list[int]]] = {}
    for path, layer in layers:
        shape = _logical_shape(layer.base_layer.weight)
        leaf = path.rsplit(".", 1)[-1]
        if shape not in shapes.setdefault(leaf, []):
            shapes[leaf].append(shape)
    picks = sorted({round(i * (len(layers) - 1) / max(SAMPLED_LAYERS - 1, 1)) for i in range(SAMPLED_LAYERS)}) if layers else []
    sampled = {}
    for index in picks:
        path, layer = layers[index]
        if layer.base_layer.weight.device.type != "meta":
            sampled[path] = _layer_entry(layer)
    name, revision = _base_id(wrapper)
    return {
        "format": FORMAT_VERSION,
        "base_model_name_or_path": name,
        "revision": revision,
        "num_layers": len(layers),
        "shapes": shapes,
        "sampled": sampled,
    }


def _sign_agreement(a: str, b: str) -> float | None:
    count_a, _, bits_a = a.partition(":")
    count_b, _, bits_b = b.partition(":")
    if count_a != count_b or not count_a.isdigit() or int(count_a) == 0:
        return None
    differing = (int(bits_a, 16) ^ int(bits_b, 16)).bit_count()
    return 1.0 - differing / int(count_a)


def _same_weights(saved: Mapping[str, Any], current: Mapping[str, Any]) -> bool:
    if saved.get("storage") == current.get("storage") and saved.get("sha256") and current.get("sha256"):
        return saved["sha256"] == current["sha256"]
    agreement = _sign_agreement(str(saved.get("signs", "")), str(current.get("signs", "")))
    return agreement is not None and agreement >= SIGN_AGREEMENT_THRESHOLD


def compare_fingerprints(saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """What differs between the base an adapter was saved with and the current one.

    Names and revisions alone are not a difference (a base moved from the Hub to a local
    folder keeps its weights); they are reported only next to a shape or weight difference.

    Args:
        saved: The fingerprint recorded in ``adapter_config.json``.
        current: `base_fingerprint` of the model being loaded onto.

    Returns:
        One human-readable line per difference; empty when the bases look the same.
    """
    if saved.get("format") != FORMAT_VERSION:
        return []  # written by a newer hf_lora: nothing we know how to compare
    diffs = []
    saved_shapes, current_shapes = saved.get("shapes", {}), current.get("shapes", {})
    # Only modules adapted on both sides are comparable (load_adapter may target other ones).
    for leaf in sorted(set(saved_shapes) & set(current_shapes)):
        if saved_shapes[leaf] != current_shapes[leaf]:
            diffs.append(f"{leaf} weight shapes {saved_shapes[leaf]} (saved) vs {current_shapes[leaf]} (this base)")
    if set(saved_shapes) == set(current_shapes) and saved.get("num_layers") != current.get("num_layers"):
        diffs.append(f"{saved.get('num_layers')} adapted layers (saved) vs {current.get('num_layers')} (this base)")
    current_sampled = current.get("sampled", {})
    differing = [path for path, entry in saved.get("sampled", {}).items()
                 if path in current_sampled and not _same_weights(entry, current_sampled[path])]
    if differing:
        diffs.append(f"weights differ in sampled layers {differing}")
    if diffs:
        for key in ("base_model_name_or_path", "revision"):
            if saved.get(key) != current.get(key):
                diffs.append(f"{key} {saved.get(key)!r} (saved) vs {current.get(key)!r} (this base)")
    return diffs


def check_base(saved: Mapping[str, Any] | None, wrapper: LoRAModelWrapper, *, strict: bool, source: str) -> None:
    """Warn (or raise with ``strict``) when ``wrapper``'s base differs from the recorded one.

    Args:
        saved: The ``hf_lora_base`` entry of the adapter config, or ``None`` (adapters saved by
            PEFT or older hf_lora carry none: nothing is checked).
        wrapper: The freshly wrapped model the adapter is about to be loaded into.
        strict: Raise instead of warning.
        source: The adapter folder, named in the message.

    Raises:
        ValueError: ``strict`` and the bases differ; the message lists every difference.
    """
    if not isinstance(saved, Mapping):
        return
    diffs = compare_fingerprints(saved, base_fingerprint(wrapper))
    if not diffs:
        return
    message = f"{source}: this adapter was saved with a different base model: " + "; ".join(diffs) + "."
    if strict:
        raise ValueError(message + " Load it onto the base it was trained on, or pass strict_base=False to load anyway.")
    warnings.warn(message + " Outputs may be meaningless; pass strict_base=True to make this an error.",
                  BaseMismatchWarning, stacklevel=4)


def recorded_fingerprint(config_path: os.PathLike[str] | str) -> dict[str, Any] | None:
    """The ``hf_lora_base`` entry of an ``adapter_config.json`` file, or ``None`` when absent."""
    import json
    from pathlib import Path

    try:
        data = json.loads(Path(config_path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None  # read_config reports unreadable files; a fingerprint is optional
    entry = data.get(FINGERPRINT_KEY) if isinstance(data, dict) else None
    return entry if isinstance(entry, dict) else None
