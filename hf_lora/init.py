"""Initialisations that build the adapter from the base weight: PiSSA and OLoRA.

Both split the pretrained weight ``W`` into a rank-r part that becomes the adapter and a
residual that stays in the (frozen) base, so a fresh adapter leaves the outputs unchanged up to
fp32 rounding even though the base weight changed:

* PiSSA (Meng et al., 2024): ``W = U S V^T``; ``B = U_r sqrt(S_r / s)``, ``A = sqrt(S_r / s) V_r^T``
  (``s`` is the layer's scaling), so ``s B A`` is the best rank-r approximation of ``W`` and
  training starts on its principal directions. ``"pissa_niter_<N>"`` uses a randomized SVD
  (``torch.svd_lowrank``, N subspace iterations): seconds instead of minutes on large layers.
* OLoRA (Büyükakyüz, 2024): ``W = Q R``; ``B = Q[:, :r]`` (orthonormal columns), ``A = R[:r]``.

In both cases the base keeps ``W - s B A``. Because the base changed, the trained adapter only
applies to that residual base; `save_as_lora` converts it to a plain rank-2r LoRA for the
ORIGINAL base: ``s (B A - B0 A0) = s [B | -B0] [A ; A0]`` where ``A0, B0`` are the initial factors.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Mapping
from pathlib import Path

import torch

from .config import BASE_INITS, LoRAConfig
from .fingerprint import FINGERPRINT_KEY
from .layers import LoRAConv1D, LoRALayer, LoRALinear
from .state import lora_layers, peft_key


def modifies_base(init: object) -> bool:
    """Whether ``init_lora_weights=init`` rewrites the base weight (PiSSA, OLoRA)."""
    return isinstance(init, str) and (init in BASE_INITS or init.startswith("pissa_niter_"))


def without_base_init(config: LoRAConfig) -> LoRAConfig:
    """``config`` with ``init_lora_weights=True`` when its init rewrites the base.

    Used when loading: a saved adapter was already initialised, so the base passed in is the
    residual base and must not be decomposed again.
    """
    return dataclasses.replace(config, init_lora_weights=True) if modifies_base(config.init_lora_weights) else config


def _linear_view(layer: LoRALayer, weight: torch.Tensor) -> torch.Tensor:
    # Conv1D stores in x out; the factorisation is of the out x in matrix the adapter models.
    return weight.T if isinstance(layer, LoRAConv1D) else weight


def check_base_init(targets: list[tuple[str, type]], init: object, model: torch.nn.Module | None = None) -> None:
    """Refuse, before any module is touched, targets a base-derived init cannot handle.

    Args:
        targets: ``(path, lora_class)`` of every planned layer.
        init: The config's ``init_lora_weights``.
        model: The model the paths refer to; when given, tied (shared) weights are refused.

    Raises:
        ValueError: a target is an embedding, a quantized layer or has a tied weight (named
            in the message).
    """
    if not modifies_base(init):
        return
    uses: dict[int, int] = {}
    if model is not None:
        for _, param in model.named_parameters(remove_duplicate=False):
            uses[id(param)] = uses.get(id(param), 0) + 1
    for path, lora_class in targets:
        weight = getattr(model.get_submodule(path), "weight", None) if model is not None else None
        if weight is not None and uses.get(id(weight), 0) > 1:
            raise ValueError(
                f"init_lora_weights={init!r} would rewrite the weight of {path!r}, which is tied to another "
                "module (e.g. input/output embeddings); exclude it or use init_lora_weights=True."
            )
        if not issubclass(lora_class, LoRALinear):
            raise ValueError(
                f"init_lora_weights={init!r} builds the adapter from a weight matrix; module {path!r} gets a "
                f"{lora_class.__name__}. Exclude it (exclude_modules) or use init_lora_weights=True."
            )
        if lora_class.__name__ in ("LoRALinear4bit", "LoRALinear8bit"):
            raise ValueError(
                f"init_lora_weights={init!r} on the quantized module {path!r} would requantize the residual and "
                "change the outputs. Load the base in 16/32-bit, wrap it, save the residual base "
                "(hf_lora.init.save_residual_base), then quantize that for training."
            )


@torch.no_grad()
def init_from_base(layer: LoRALayer, init: object) -> None:
    """Set ``layer``'s factors from its base weight and leave the residual in the base.

    A no-op for inits that do not use the base (``True``, ``False``, ``"gaussian"``). The layer
    must be one `check_base_init` accepts.
    """
    if not modifies_base(init):
        return
    path = getattr(layer, "_hf_lora_path", type(layer).__name__)
    check_base_init([(path, type(layer))], init)
    weight = _linear_view(layer, layer.read_base_weight())  # fp32, out x in
    r, scaling = layer.r, layer.scaling
    if init == "olora":
        q, rr = torch.linalg.qr(weight)
        b, a = q[:, :r], rr[:r]
    else:
        if init == "pissa":
            u, s, vh = torch.linalg.svd(weight, full_matrices=False)
            u, s, vh = u[:, :r], s[:r], vh[:r]
        else:
            niter = int(str(init).rsplit("_", 1)[-1])
            u, s, v = torch.svd_lowrank(weight, q=r, niter=niter)
            vh = v.T
        root = torch.sqrt(s / scaling)
        b, a = u * root, root[:, None] * vh
    layer.lora_A.weight.copy_(a)
    layer.lora_B.weight.copy_(b)
    # s B A itself, not layer.delta_weight(): for DoRA layers that is W' - W.
    lora = _linear_view(layer, (b @ a) * scaling)
    layer.write_base_weight(layer.read_base_weight() - lora)


# --- after training: conversion for the original base ------------------------------------------


def _factor_keys(path: str, layer: LoRALayer) -> tuple[str, str]:
    """PEFT keys of ``layer``'s (A, B) factors."""
    a_name, b_name = layer.adapter_attribute_names[:2]
    suffix = "" if isinstance(getattr(layer, a_name), torch.nn.Parameter) else ".weight"
    return peft_key(f"{path}.{a_name}{suffix}"), peft_key(f"{path}.{b_name}{suffix}")


def lora_delta_tensors(wrapper: object, initial: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The wrapper's adapter tensors with each (A, B) pair replaced by ``[A ; A0]``, ``[B | -B0]``.

    ``initial`` holds the factors right after initialisation, under PEFT keys (what
    ``adapter_tensors`` returned then, or the tensors of an adapter folder saved then).
    """
    from .checkpoint import adapter_tensors

    if wrapper.lora_config.use_dora:
        raise ValueError("save_as_lora cannot convert a DoRA adapter: its change to W is not B A - B0 A0. Save it with save_pretrained and keep the residual base.")
    tensors = adapter_tensors(wrapper)
    for path, layer in lora_layers(wrapper.base_model):
        for key, dim, sign in zip(_factor_keys(path, layer), (0, 1), (1.0, -1.0)):
            if key not in initial:
                raise ValueError(f"The initial adapter has no tensor {key!r}; it must come from the same wrap (same config and model).")
            start = initial[key].to(tensors[key].dtype)
            if start.shape != tensors[key].shape:
                raise ValueError(f"Initial tensor {key!r} has shape {tuple(start.shape)}, the adapter has {tuple(tensors[key].shape)}.")
            tensors[key] = torch.cat([tensors[key], sign * start], dim=dim).contiguous()
    return tensors


def lora_delta_config(config_dict: Mapping[str, object]) -> dict[str, object]:
    """``adapter_config.json`` content for the rank-2r conversion: doubled ranks, same scalings."""
    out = dict(config_dict)
    # scaling = alpha / r (or / sqrt(r)): doubling r needs alpha x2 (or x sqrt(2)) to keep it.
    factor = math.sqrt(2) if out.get("use_rslora") else 2.0
    out["r"] = 2 * int(out["r"])
    out["lora_alpha"] = float(out["lora_alpha"]) * factor
    out["rank_pattern"] = {k: 2 * int(v) for k, v in (out.get("rank_pattern") or {}).items()}
    out["alpha_pattern"] = {k: float(v) * factor for k, v in (out.get("alpha_pattern") or {}).items()}
    out["init_lora_weights"] = True
    # The recorded base fingerprint describes the residual base, not the original this applies to.
    out.pop(FINGERPRINT_KEY, None)
    return out


def initial_adapter_tensors(wrapper: object) -> dict[str, torch.Tensor]:
    """A copy of the adapter tensors now (call right after `wrap`), for `save_as_lora` later."""
    from .checkpoint import adapter_tensors

    return {k: v.clone() for k, v in adapter_tensors(wrapper).items()}


def save_as_lora(
    wrapper: object, directory: str | os.PathLike[str], initial: str | os.PathLike[str] | Mapping[str, torch.Tensor]
) -> Path:
    """Save a PiSSA/OLoRA-trained adapter as a plain LoRA for the ORIGINAL (unmodified) base.

    Like PEFT's ``save_pretrained(path_initial_model_for_weight_conversion=...)``: the saved
    adapter has rank 2r and ``delta = s (B A - B0 A0)``, so loading it (here or in PEFT) on the
    original model gives the fine-tuned outputs.

    Args:
        wrapper: The trained `LoRAModelWrapper`.
        directory: Output folder (PEFT layout).
        initial: The adapter right after initialisation: a folder saved then with
            ``save_pretrained`` or the dict `initial_adapter_tensors` returned.
    """
    from safetensors.torch import save_file

    from .checkpoint import CONFIG_NAME, WEIGHTS_NAME, adapter_config_dict, atomic_write, read_tensors

    start = read_tensors(Path(initial)) if isinstance(initial, (str, os.PathLike)) else initial
    tensors = lora_delta_tensors(wrapper, start)
    config = lora_delta_config(adapter_config_dict(wrapper))
    folder = Path(directory)
    atomic_write(folder / WEIGHTS_NAME, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    atomic_write(folder / CONFIG_NAME, lambda tmp: Path(tmp).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n"))
    return folder


def residual_state_dict(wrapper: object) -> dict[str, torch.Tensor]:
    """The base model's state dict as it is now (residual weights), under the ORIGINAL keys.

    LoRA layers contribute their ``base_layer`` tensors renamed back (``q_proj.base_layer.weight``
    -> ``q_proj.weight``); adapter tensors are left out.
    """
    from .state import adapter_parameters

    skip = {id(p) for p in adapter_parameters(wrapper.base_model, "none").values()}
    out: dict[str, torch.Tensor] = {}
    for name, tensor in wrapper.base_model.state_dict(keep_vars=True).items():
        if id(tensor) in skip:
            continue  # LoRA factors and modules_to_save copies
        out[name.replace(".base_layer.", ".").replace(".original_module.", ".")] = tensor.detach()
    return out


def save_residual_base(wrapper: object, directory: str | os.PathLike[str]) -> None:
    """``save_pretrained`` the residual base (the model PiSSA/OLoRA adapters apply to)."""
    wrapper.base_model.save_pretrained(str(directory), state_dict=residual_state_dict(wrapper))
