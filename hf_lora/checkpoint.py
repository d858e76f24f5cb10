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
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from .config import LoRAConfig
from .fingerprint import FINGERPRINT_KEY, base_fingerprint, check_base, recorded_fingerprint
from .init import modifies_base, without_base_init
from .layers import LoRAConv1D
from .peft_compat import drop_absent_modules_to_save, drop_duplicate_head_keys, task_type_for_peft

# atomic_write is re-exported here: the helper every hf_lora writer (merge, reports) uses.
from .safe_io import atomic_write, atomic_write_files, check_relative_name, safe_join  # noqa: F401
from .state import lora_layers, peft_key
from .tokens import resize_for_tokens

if TYPE_CHECKING:
    from .model import LoRAModelWrapper

logger = logging.getLogger(__name__)

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
LEGACY_WEIGHTS_NAME = "adapter_model.bin"
_TASK_TYPES = {"ForCausalLM": "CAUSAL_LM", "ForSequenceClassification": "SEQ_CLS", "ForTokenClassification": "TOKEN_CLS",
               "ForQuestionAnswering": "QUESTION_ANS", "ForConditionalGeneration": "SEQ_2_SEQ_LM"}


# Ties the two files of one save together: the weights' metadata repeats the config fields that
# decide what the tensors mean, so a pair from two saves (a crash between the two renames, files
# copied from two adapters) is reported on load. Other fields may be edited by hand freely.
SETTINGS_KEY = "hf_lora_settings"
_SETTINGS_FIELDS = ("r", "lora_alpha", "use_rslora", "rank_pattern", "alpha_pattern", "target_modules",
                    "exclude_modules", "modules_to_save", "bias")
# adapter_config.json is a few KB; refusing giant files keeps a hostile one from exhausting memory.
MAX_CONFIG_BYTES = 16 * 1024 * 1024


def _base_name_or_path(base: nn.Module) -> str | None:
    config = getattr(base, "config", None)
    return getattr(config, "_name_or_path", None) or getattr(base, "name_or_path", None) or None


def _task_type(wrapper: LoRAModelWrapper) -> str | None:
    task = wrapper.lora_config.task_type
    if not task:
        name = type(wrapper.base_model).__name__
        task = next((task for suffix, task in _TASK_TYPES.items() if name.endswith(suffix)), None)
    return task_type_for_peft(task, wrapper.base_model)  # PEFT must not expect an unsaved head


def adapter_config_dict(wrapper: LoRAModelWrapper) -> dict[str, Any]:
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
        "init_lora_weights": True if modifies_base(cfg.init_lora_weights) else cfg.init_lora_weights,  # applied: never redo on load
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "modules_to_save": list(cfg.modules_to_save) if cfg.modules_to_save else None,
        "fan_in_fan_out": any(isinstance(layer, LoRAConv1D) for _, layer in layers),
        "use_dora": cfg.use_dora,
        "trainable_token_indices": cfg.to_dict()["trainable_token_indices"],
        "lora_bias": False,
    }


def adapter_tensors(wrapper: LoRAModelWrapper) -> dict[str, torch.Tensor]:
    """Adapter tensors under PEFT's keys, contiguous, on CPU (ready for safetensors).

    Zero padding that adapter switching adds beyond the active adapter's rank is trimmed.
    """
    from .adapters import logical_adapter_state

    return {peft_key(path): p.detach().to("cpu").contiguous() for path, p in logical_adapter_state(wrapper).items()}


def save_adapter(wrapper: LoRAModelWrapper, directory: str | os.PathLike[str], **card_fields: Any) -> Path:
    """Write the adapter folder crash-safely. Returns the folder.

    All three files are staged in the folder first and then renamed into place, so a failed
    write (disk full, read-only folder) leaves the previous adapter untouched, and a crash
    leaves each file either old or new. The weights' metadata repeats the config fields that
    give the tensors their meaning, so a pair from two different saves is reported on load.
    """
    from .hub import model_card

    folder = Path(directory)
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"Cannot save the adapter to {str(folder)!r}: it exists and is not a folder.")
    tensors = adapter_tensors(wrapper)
    config = adapter_config_dict(wrapper)
    config_bytes = (json.dumps(config, indent=2, sort_keys=True) + "\n").encode("utf-8")
    metadata = {"format": "pt", SETTINGS_KEY: json.dumps(_settings(config), sort_keys=True)}
    card = model_card(wrapper, **card_fields)
    atomic_write_files({
        folder / WEIGHTS_NAME: lambda tmp: save_file(tensors, tmp, metadata=metadata),
        folder / CONFIG_NAME: lambda tmp: Path(tmp).write_bytes(config_bytes),
        folder / "README.md": lambda tmp: Path(tmp).write_text(card, encoding="utf-8"),
    })
    return folder


# --- reading ---------------------------------------------------------------------------------


def resolve_adapter_folder(model_id: str, *, revision: str | None, token: str | None, subfolder: str | None) -> Path:
    """A local folder holding the adapter files: ``model_id`` itself, or a Hub download.

    ``subfolder`` must stay inside the folder or repository (no ``..``, absolute path or
    symlink leading out); `hf_lora.safe_io.safe_join` checks it.
    """
    if subfolder:
        check_relative_name(subfolder, what="subfolder")
    if subfolder and Path(model_id).is_dir():
        local = safe_join(model_id, subfolder, what="subfolder")
    else:
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
    # allow_patterns: only the adapter files are fetched, never code or pickles of the repo.
    try:
        snapshot = snapshot_download(model_id, revision=revision, token=token, allow_patterns=patterns)
    except OSError as exc:  # not found, no network, offline mode: all OSError subclasses in huggingface_hub
        raise ValueError(
            f"Adapter {model_id!r} is not a local folder and could not be fetched from the Hub "
            f"({type(exc).__name__}: {exc})."
        ) from None
    return safe_join(snapshot, subfolder, what="subfolder") if subfolder else Path(snapshot)


def read_config(folder: Path) -> LoRAConfig:
    """Parse and validate ``adapter_config.json``; every problem names the file."""
    path = folder / CONFIG_NAME
    if not path.is_file():
        raise ValueError(f"{path}: missing; an adapter folder needs {CONFIG_NAME} next to {WEIGHTS_NAME}.")
    size = path.stat().st_size
    if size > MAX_CONFIG_BYTES:
        raise ValueError(f"{path}: {size:,d} bytes is too large for an adapter config (limit {MAX_CONFIG_BYTES:,d}).")
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except (ValueError, RecursionError) as exc:  # bad UTF-8 or JSON, over-long integers, absurd nesting
        raise ValueError(f"{path}: not valid UTF-8 JSON ({type(exc).__name__}: {str(exc)[:200]}).") from None
    return LoRAConfig.from_dict(data, source=str(path))


def weights_path(folder: Path) -> Path:
    """The weights file `read_tensors` reads in ``folder`` (safetensors first, else legacy ``.bin``)."""
    path = folder / WEIGHTS_NAME
    return path if path.is_file() or not (folder / LEGACY_WEIGHTS_NAME).is_file() else folder / LEGACY_WEIGHTS_NAME


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
            lines = str(exc).splitlines()
            reason = next((line.strip() for line in lines if "Unsupported global" in line), " ".join(lines)[:300])
            raise ValueError(
                f"{legacy}: cannot be read safely ({reason}). Legacy .bin files are read with "
                "torch.load(weights_only=True), which refuses anything but tensors because unpickling "
                "other objects can run code; convert a file you trust to adapter_model.safetensors."
            ) from None
        if not isinstance(data, dict) or not all(isinstance(v, torch.Tensor) for v in data.values()):
            raise ValueError(f"{legacy}: expected a dict of tensors.")
        return data
    raise ValueError(f"{path}: missing; the adapter folder {str(folder)!r} holds no adapter weights.")


def _settings(config: dict[str, Any]) -> dict[str, Any]:
    return {name: config.get(name) for name in _SETTINGS_FIELDS}


def check_same_save(folder: Path) -> None:
    """Warn when the weights were saved with other LoRA settings than ``adapter_config.json`` holds.

    That happens when a save was interrupted between its renames, when files of two adapters
    are mixed, or when the config was edited by hand; the warning lists the differing fields.
    Files without the record (PEFT's, older hf_lora) are not checked.
    """
    path = folder / WEIGHTS_NAME
    if not path.is_file():
        return
    try:
        with safe_open(str(path), framework="pt") as handle:
            recorded = (handle.metadata() or {}).get(SETTINGS_KEY)
        saved = json.loads(recorded) if recorded is not None else None
        current = _settings(json.loads((folder / CONFIG_NAME).read_bytes().decode("utf-8")))
    except (SafetensorError, OSError, RuntimeError, ValueError, RecursionError, AttributeError):
        return  # read_config / read_tensors report unreadable files; this record is optional
    if not isinstance(saved, dict):
        return
    diffs = [f"{k}={saved.get(k)!r} with the weights, {current[k]!r} in the config"
             for k in _SETTINGS_FIELDS if saved.get(k) != current[k]]
    if diffs:
        warnings.warn(
            f"{path} was saved with other settings than {folder / CONFIG_NAME}: {'; '.join(diffs)}. "
            "An interrupted save or files from two adapters? Save the adapter again, or ignore this "
            "if you edited the config on purpose.", stacklevel=4,
        )


def load_tensors_into(wrapper: LoRAModelWrapper, tensors: dict[str, torch.Tensor], source: str) -> None:
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
    for key in [*params, *base_overrides]:
        # NaN/inf never come out of training that worked; loading them would poison every output.
        tensor = tensors[key]
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor.float()).all()):
            raise ValueError(f"{source}: tensor {key!r} contains NaN or infinite values.")
    with torch.no_grad():
        for key, param in params.items():
            param.copy_(tensors[key].to(param.dtype))
        for key, (param, tensor) in base_overrides.items():
            if not torch.equal(param.detach().cpu(), tensor.to(param.dtype).cpu()):
                logger.warning("%s: loading base tensor %s from the adapter file (PEFT saved a full copy).", source, key)
                param.copy_(tensor.to(param.dtype))


def check_tensor_values(tensors: dict[str, torch.Tensor], source: str) -> None:
    """Refuse adapter tensors that are not floating point or hold NaN/inf (``ValueError`` naming ``source``)."""
    for key, tensor in tensors.items():
        if not tensor.is_floating_point():
            raise ValueError(f"{source}: tensor {key!r} has dtype {tensor.dtype}; expected a floating point dtype.")
        if not bool(torch.isfinite(tensor.float()).all()):
            raise ValueError(f"{source}: tensor {key!r} contains NaN or infinite values.")


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


def _token_rows(model: nn.Module) -> int | None:
    getter = getattr(model, "get_input_embeddings", None)
    try:
        weight = getattr(getter(), "weight", None) if callable(getter) else None
    except (AttributeError, NotImplementedError):  # models without token embeddings
        return None
    return int(weight.shape[0]) if isinstance(weight, torch.Tensor) else None


def _check_token_growth(config: LoRAConfig, rows: int | None, source: Path) -> None:
    """Refuse token ids that would grow the base embedding absurdly, before anything is allocated."""
    spec = getattr(config, "trainable_token_indices", None)
    if not spec or rows is None:
        return
    ids = [i for group in (spec.values() if isinstance(spec, Mapping) else [spec]) for i in group]
    limit = max(2 * rows, rows + 65_536)  # an adapter adds tokens; it does not multiply the vocabulary
    if ids and max(ids) >= limit:
        raise ValueError(
            f"{source}: trainable_token_indices reaches token id {max(ids)}, but the base embedding has {rows} rows; "
            f"loading would grow it past {limit} rows. Resize the base to your tokenizer first if this is intended."
        )


def load_pretrained(
    base_model: nn.Module, model_id: str, *, is_trainable: bool, revision: str | None, token: str | None, subfolder: str | None,
    strict_base: bool = False,
) -> LoRAModelWrapper:
    """`LoRAModelWrapper.from_pretrained`: read, validate, wrap, load; the base is untouched on error."""
    from .model import LoRAModelWrapper

    folder = resolve_adapter_folder(model_id, revision=revision, token=token, subfolder=subfolder)
    config = drop_absent_modules_to_save(read_config(folder), base_model, str(folder / CONFIG_NAME))
    tensors = drop_duplicate_head_keys(read_tensors(folder))
    check_same_save(folder)
    flags = {name: p.requires_grad for name, p in base_model.named_parameters()}
    rows = _token_rows(base_model)
    _check_token_growth(config, rows, folder / CONFIG_NAME)
    resize_for_tokens(base_model, config.trainable_token_indices, str(folder))  # new tokens: grow the base, with a warning
    try:
        try:
            # Planning raises before the model is touched; the message must still name the file.
            wrapper = LoRAModelWrapper(base_model, without_base_init(config))
        except ValueError as exc:
            raise ValueError(f"{folder / CONFIG_NAME}: {exc}") from None
        try:
            check_base(recorded_fingerprint(folder / CONFIG_NAME), wrapper, strict=strict_base, source=str(folder))
            load_tensors_into(wrapper, tensors, str(weights_path(folder)))
        except BaseException:
            wrapper._restore_base()
            raise
    except BaseException:
        if rows is not None and _token_rows(base_model) != rows:
            base_model.resize_token_embeddings(rows)  # keeps the first rows: the original weights, bit for bit
        for name, param in base_model.named_parameters():
            param.requires_grad_(flags.get(name, param.requires_grad))
        raise
    if not is_trainable:
        for param in wrapper.parameters():
            param.requires_grad_(False)
        wrapper.eval()
    return wrapper
