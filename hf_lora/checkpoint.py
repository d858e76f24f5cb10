"""Adapter files in PEFT's format: ``adapter_config.json`` + ``adapter_model.safetensors``.

Saving writes the adapter tensors only (never a frozen base tensor, not even for embedding
adapters), under PEFT's keys (``base_model.model.<path>.lora_A.weight``). Loading reads ours
or PEFT's files, checks every key and shape against the model before changing anything, and
never unpickles (a legacy ``adapter_model.bin`` is read with ``weights_only=True``).
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from .config import LoRAConfig
from .fingerprint import FINGERPRINT_KEY, base_fingerprint, check_base, recorded_fingerprint
from .layers import LoRAConv1D
from .state import lora_layers, peft_key

if TYPE_CHECKING:
    from .model import LoRAModelWrapper

logger = logging.getLogger(__name__)

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
LEGACY_WEIGHTS_NAME = "adapter_model.bin"
_TASK_TYPES = {"ForCausalLM": "CAUSAL_LM", "ForSequenceClassification": "SEQ_CLS", "ForTokenClassification": "TOKEN_CLS",
               "ForQuestionAnswering": "QUESTION_ANS", "ForConditionalGeneration": "SEQ_2_SEQ_LM"}


def atomic_write(path: Path, write: Callable[[str], None]) -> None:
    """Write through a temporary file in the same folder, fsync it, then rename over ``path``.

    A crash at any point leaves either the previous complete file or the new complete one.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _base_name_or_path(base: nn.Module) -> str | None:
    config = getattr(base, "config", None)
    return getattr(config, "_name_or_path", None) or getattr(base, "name_or_path", None) or None


def _task_type(wrapper: "LoRAModelWrapper") -> str | None:
    if wrapper.lora_config.task_type:
        return wrapper.lora_config.task_type
    name = type(wrapper.base_model).__name__
    return next((task for suffix, task in _TASK_TYPES.items() if name.endswith(suffix)), None)


def adapter_config_dict(wrapper: "LoRAModelWrapper") -> dict[str, Any]:
    """The ``adapter_config.json`` content: PEFT's fields, with targets resolved for this model."""
    cfg = wrapper.lora_config
    layers = lora_layers(wrapper.base_model)
    ranks = {path: layer.r for path, layer in layers}
    # Per-module overrides are written as exact paths so PEFT resolves them identically.
    rank_pattern = {path: r for path, r in ranks.items() if r != cfg.r}
    alpha_pattern = {path: cfg.alpha_for(path) for path in ranks if cfg.alpha_for(path) != cfg.lora_alpha}
    fingerprint = base_fingerprint(wrapper)
    return {
        "peft_type": "LORA",
        "task_type": _task_type(wrapper),
        "base_model_name_or_path": _base_name_or_path(wrapper.base_model),
        "revision": fingerprint["revision"],  # PEFT's field for the base model's revision
        FINGERPRINT_KEY: fingerprint,  # PEFT drops unknown keys on load; see fingerprint.py
        "inference_mode": True,
        "r": cfg.r,
        "lora_alpha": cfg.lora_alpha,
        "lora_dropout": cfg.lora_dropout,
        "target_modules": wrapper.peft_target_modules,
        "exclude_modules": None,
        "bias": cfg.bias,
        "use_rslora": cfg.use_rslora,
        "init_lora_weights": cfg.init_lora_weights,
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "modules_to_save": list(cfg.modules_to_save) if cfg.modules_to_save else None,
        "fan_in_fan_out": any(isinstance(layer, LoRAConv1D) for _, layer in layers),
        "use_dora": False,
        "lora_bias": False,
    }


def adapter_tensors(wrapper: "LoRAModelWrapper") -> dict[str, torch.Tensor]:
    """Adapter tensors under PEFT's keys, contiguous, on CPU (ready for safetensors)."""
    return {peft_key(path): p.detach().to("cpu").contiguous() for path, p in wrapper.adapter_parameters().items()}


def save_adapter(wrapper: "LoRAModelWrapper", directory: str | os.PathLike[str], **card_fields: Any) -> Path:
    """Write the adapter folder atomically, file by file. Returns the folder."""
    from .hub import model_card

    folder = Path(directory)
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"Cannot save the adapter to {str(folder)!r}: it exists and is not a folder.")
    tensors = adapter_tensors(wrapper)
    config = adapter_config_dict(wrapper)
    atomic_write(folder / WEIGHTS_NAME, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    atomic_write(folder / CONFIG_NAME, lambda tmp: Path(tmp).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n"))
    card = model_card(wrapper, **card_fields)
    atomic_write(folder / "README.md", lambda tmp: Path(tmp).write_text(card, encoding="utf-8"))
    return folder


# --- reading ---------------------------------------------------------------------------------


def resolve_adapter_folder(model_id: str, *, revision: str | None, token: str | None, subfolder: str | None) -> Path:
    """A local folder holding the adapter files: ``model_id`` itself, or a Hub download."""
    local = Path(model_id) / (subfolder or "")
    if local.is_dir():
        return local
    looks_like_path = model_id.startswith((".", "/", "~")) or model_id.count("/") > 1
    if Path(model_id).exists() or looks_like_path:
        raise ValueError(f"Adapter folder {str(local)!r} does not exist.")
    from huggingface_hub import snapshot_download

    patterns = [CONFIG_NAME, WEIGHTS_NAME, LEGACY_WEIGHTS_NAME]
    if subfolder:
        patterns = [f"{subfolder}/{p}" for p in patterns]
    snapshot = snapshot_download(model_id, revision=revision, token=token, allow_patterns=patterns)
    return Path(snapshot) / (subfolder or "")


def read_config(folder: Path) -> LoRAConfig:
    """Parse and validate ``adapter_config.json``; every problem names the file."""
    path = folder / CONFIG_NAME
    if not path.is_file():
        raise ValueError(f"{path}: missing; an adapter folder needs {CONFIG_NAME} next to {WEIGHTS_NAME}.")
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: not valid UTF-8 JSON ({exc}).") from None
    return LoRAConfig.from_dict(data, source=str(path))


def read_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """Read the adapter tensors (safetensors; legacy ``.bin`` only with ``weights_only=True``)."""
    path = folder / WEIGHTS_NAME
    if path.is_file():
        try:
            with safe_open(str(path), framework="pt") as handle:
                return {key: handle.get_tensor(key) for key in handle.keys()}
        except (SafetensorError, OSError, RuntimeError, ValueError) as exc:
            raise ValueError(f"{path}: unreadable or truncated safetensors file ({exc}).") from None
    legacy = folder / LEGACY_WEIGHTS_NAME
    if legacy.is_file():
        try:
            data = torch.load(str(legacy), map_location="cpu", weights_only=True)
        except Exception as exc:  # any failure of a legacy file is a bad file, not a crash
            raise ValueError(f"{legacy}: cannot be read safely ({exc}).") from None
        if not isinstance(data, dict) or not all(isinstance(v, torch.Tensor) for v in data.values()):
            raise ValueError(f"{legacy}: expected a dict of tensors.")
        return data
    raise ValueError(f"{path}: missing; the adapter folder {str(folder)!r} holds no adapter weights.")


def load_tensors_into(wrapper: "LoRAModelWrapper", tensors: dict[str, torch.Tensor], source: str) -> None:
    """Copy PEFT-keyed ``tensors`` into the wrapper after checking every key and shape.

    Raises ``ValueError`` (naming ``source``) before any copy when a key is missing or
    unexpected or a shape differs. A PEFT file that carries a full copy of a base embedding
    (PEFT's ``save_embedding_layers``) is accepted: equal values are skipped, different ones
    are loaded into the base with a warning.
    """
    params = {peft_key(path): p for path, p in wrapper.adapter_parameters().items()}
    base = wrapper.base_model
    base_overrides: dict[str, tuple[nn.Parameter, torch.Tensor]] = {}
    unexpected = []
    for key, tensor in tensors.items():
        if key in params:
            continue
        base_param = _base_parameter(base, key)
        if base_param is None:
            unexpected.append(key)
        else:
            base_overrides[key] = (base_param, tensor)
    missing = [k for k in params if k not in tensors]
    if missing or unexpected:
        raise ValueError(
            f"{source}: adapter keys do not match the model: missing {missing[:3]}"
            f"{' ...' if len(missing) > 3 else ''}, unexpected {unexpected[:3]}{' ...' if len(unexpected) > 3 else ''}."
        )
    for key, param in params.items():
        _check_shape(source, key, tuple(tensors[key].shape), tuple(param.shape))
        if not tensors[key].is_floating_point():
            raise ValueError(f"{source}: tensor {key!r} has dtype {tensors[key].dtype}; expected a floating point dtype.")
    for key, (param, tensor) in base_overrides.items():
        _check_shape(source, key, tuple(tensor.shape), tuple(param.shape))
    with torch.no_grad():
        for key, param in params.items():
            param.copy_(tensors[key].to(param.dtype))
        for key, (param, tensor) in base_overrides.items():
            if not torch.equal(param.detach().cpu(), tensor.to(param.dtype).cpu()):
                logger.warning("%s: loading base tensor %s from the adapter file (PEFT saved a full copy).", source, key)
                param.copy_(tensor.to(param.dtype))


def _check_shape(source: str, key: str, found: tuple[int, ...], expected: tuple[int, ...]) -> None:
    if found != expected:
        raise ValueError(f"{source}: tensor {key!r} has shape {found} but the model expects {expected}.")


def _base_parameter(base: nn.Module, key: str) -> nn.Parameter | None:
    prefix = "base_model.model."
    if not key.startswith(prefix):
        return None
    try:
        param = base.get_parameter(key[len(prefix):])
    except AttributeError:
        return None
    return None if param.requires_grad else param


def load_pretrained(
    base_model: nn.Module, model_id: str, *, is_trainable: bool, revision: str | None, token: str | None, subfolder: str | None,
    strict_base: bool = False,
) -> "LoRAModelWrapper":
    """`LoRAModelWrapper.from_pretrained`: read, validate, wrap, load; the base is untouched on error."""
    from .model import LoRAModelWrapper

    folder = resolve_adapter_folder(model_id, revision=revision, token=token, subfolder=subfolder)
    config = read_config(folder)
    tensors = read_tensors(folder)
    flags = {name: p.requires_grad for name, p in base_model.named_parameters()}
    wrapper = LoRAModelWrapper(base_model, config)
    try:
        check_base(recorded_fingerprint(folder / CONFIG_NAME), wrapper, strict=strict_base, source=str(folder))
        load_tensors_into(wrapper, tensors, str(folder))
    except BaseException:
        wrapper._restore_base()
        for name, param in base_model.named_parameters():
            param.requires_grad_(flags.get(name, param.requires_grad))
        raise
    if not is_trainable:
        for param in wrapper.parameters():
            param.requires_grad_(False)
        wrapper.eval()
    return wrapper
