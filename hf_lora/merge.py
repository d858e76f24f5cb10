"""Streaming merge: base checkpoint + adapter -> a standalone model folder plain transformers loads.

The base is never loaded whole. Its safetensors shards are read one tensor at a time; every
tensor passes through unchanged except the weights an adapter touches, which are merged by the
adapter's own layer class (`LoRALayer.merge`, DoRA included) on a model skeleton that lives on
the ``meta`` device. Peak memory is therefore about one output shard plus one layer, not one
model, and the maths is exactly the library's (fp32, NaN/inf refused).

A bitsandbytes 4-bit or 8-bit checkpoint is dequantized tensor by tensor and merged into a 16-bit
(or fp32) copy: requantizing would round the merged weights a second time, so the output is
never quantized. The folder is written under a temporary name and renamed when complete.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from .checkpoint import atomic_write, read_config, read_tensors, resolve_adapter_folder
from .init import without_base_init
from .layers import LoRALayer, TrainedCopy, all_finite
from .peft_compat import drop_absent_modules_to_save, drop_duplicate_head_keys
from .safe_io import staging_folder
from .state import peft_key
from .tokens import TrainableTokens

DTYPES: dict[str, torch.dtype] = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32,
                                  "bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
_INDEX = "model.safetensors.index.json"
# Tensors bitsandbytes stores next to a quantized weight; they are folded into it when dequantizing.
_QUANT_SUFFIX = re.compile(r"\.(absmax|quant_map|nested_absmax|nested_quant_map|quant_state\.bitsandbytes__\w+|SCB|weight_format)$")
_WEIGHT_FILES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".msgpack", ".h5")


@dataclass(frozen=True)
class MergeReport:
    """What `merge_adapter` did."""

    output: str
    layers_merged: int
    tensors_written: int
    shards: int
    dtype: str
    dequantized: int  # quantized base weights turned back into dense ones
    seconds: float


def parse_dtype(name: str | None) -> torch.dtype | None:
    """``"bf16"`` / ``"fp16"`` / ``"fp32"`` (or the long names) to a torch dtype; None keeps the base's."""
    if name is None or name == "auto":
        return None
    if name not in DTYPES:
        raise ValueError(f"--dtype {name!r} is invalid: expected one of auto, {', '.join(DTYPES)}.")
    return DTYPES[name]


def resolve_base_folder(base: str) -> Path:
    """A local folder with the base's config and safetensors shards (downloaded when ``base`` is a Hub id)."""
    local = Path(base)
    if local.is_dir():
        folder = local
    elif local.exists() or base.startswith((".", "/", "~")) or base.count("/") > 1:
        raise ValueError(f"Base model folder {base!r} does not exist.")
    else:
        from huggingface_hub import snapshot_download

        try:
            folder = Path(snapshot_download(base, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"]))
        except Exception as exc:  # offline, missing repo, gated: one actionable message
            raise ValueError(f"Base model {base!r} is neither a local folder nor a Hub repo that can be fetched ({exc}).") from None
    if not (folder / "config.json").is_file():
        raise ValueError(f"{folder}: no config.json; the base must be a transformers save_pretrained folder.")
    if not _shards(folder):
        raise ValueError(f"{folder}: no .safetensors weights; `hf-lora merge` streams safetensors checkpoints only "
                         "(convert a .bin checkpoint by loading and re-saving it with transformers).")
    return folder


def _shards(folder: Path) -> list[str]:
    index = folder / _INDEX
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return sorted(set(weight_map.values()))
    return sorted(p.name for p in folder.glob("*.safetensors"))


def _skeleton(config: Any, trust_remote_code: bool) -> nn.Module:
    """The base architecture on the meta device (no memory), built from its config."""
    import transformers

    arch = (getattr(config, "architectures", None) or [None])[0]
    with torch.device("meta"):
        if arch is not None and hasattr(transformers, arch):
            return getattr(transformers, arch)._from_config(config)
        return transformers.AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)


def _materialize_adapter(wrapper: Any, tensors: dict[str, torch.Tensor], source: str) -> None:
    """Replace the skeleton's meta adapter parameters by the file's tensors, after a full key check."""
    params = wrapper.adapter_parameters()
    by_key = {peft_key(path): path for path in params}
    missing = sorted(set(by_key) - set(tensors))
    unexpected = sorted(set(tensors) - set(by_key))
    if missing or unexpected:
        raise ValueError(f"{source}: adapter keys do not match the base model: missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]}.")
    root = wrapper.base_model
    for key, path in by_key.items():
        owner, _, name = path.rpartition(".")
        module = root.get_submodule(owner) if owner else root
        expected = tuple(params[path].shape)
        if tuple(tensors[key].shape) != expected:
            raise ValueError(f"{source}: tensor {key!r} has shape {tuple(tensors[key].shape)}, the base expects {expected}.")
        module._parameters[name] = nn.Parameter(tensors[key].float(), requires_grad=False)


def _dequantize(key: str, handle: Any, keys: set[str], quant: dict[str, Any] | None) -> tuple[torch.Tensor, bool]:
    """The tensor at ``key`` as a dense tensor, dequantizing bitsandbytes 4-bit / 8-bit weights."""
    tensor = handle.get_tensor(key)
    owner = key.rpartition(".")[0]
    if quant and quant.get("load_in_4bit") and any(k.startswith(key + ".quant_state.") for k in keys):
        import bitsandbytes.functional as bnbF

        parts = {k[len(key) + 1:]: handle.get_tensor(k) for k in keys if k.startswith(key + ".")}
        state = bnbF.QuantState.from_dict(parts, device=torch.device("cpu"))
        return bnbF.dequantize_4bit(tensor, state).float(), True
    if quant and quant.get("load_in_8bit") and tensor.dtype == torch.int8 and f"{owner}.SCB" in keys:
        scale = handle.get_tensor(f"{owner}.SCB").float()
        return tensor.float() * (scale.unsqueeze(1) / 127.0), True
    return tensor, False


def _merged_tensor(root: nn.Module, key: str, dense: torch.Tensor, adapter_params: dict[str, nn.Parameter]) -> tuple[torch.Tensor, bool]:
    """``(tensor to write, was it changed by the adapter)`` for checkpoint tensor ``key``."""
    owner_path, _, attr = key.rpartition(".")
    try:
        owner = root.get_submodule(owner_path)
    except AttributeError:
        return dense, False
    if isinstance(owner, LoRALayer):
        if attr != "weight":
            trained = adapter_params.get(f"{owner_path}.base_layer.{attr}")  # a trained bias
            return (trained.data, True) if trained is not None else (dense, False)
        base = owner.base_layer
        base._parameters["weight"] = nn.Parameter(dense.float(), requires_grad=False)
        try:
            owner.merge(keep_original=False)
            merged = base.weight.data
        finally:
            owner.merged = False
            base._parameters["weight"] = nn.Parameter(torch.empty_like(dense, device="meta"), requires_grad=False)
        return merged, True
    if isinstance(owner, TrainableTokens) and attr == "weight":
        rows = list(owner.adapter.token_indices)
        out = dense.float().clone()
        out[rows] = owner.adapter.trainable_tokens_delta.data.float()
        return out, True
    if isinstance(owner, TrainedCopy):
        return owner.trained_module.get_parameter(attr).data, True
    trained = adapter_params.get(key)  # bias="all": a base bias outside the adapted layers
    return (trained.data, True) if trained is not None else (dense, False)


def _grow_vocab(config: Any, token_spec: Any) -> int:
    """The vocabulary size trainable token rows need when it exceeds the base's (else 0); sets it on ``config``.

    An adapter trained after ``resize_token_embeddings`` lists token ids the base checkpoint has
    no rows for; the merged embedding (and output layer) get those rows, holding the trained values.
    """
    if not token_spec:
        return 0
    ids = [i for group in (token_spec.values() if isinstance(token_spec, Mapping) else [token_spec]) for i in group]
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    needed = max(ids) + 1
    if needed <= text.vocab_size:
        return 0
    text.vocab_size = needed
    return needed


def _path(model: nn.Module, module: nn.Module) -> str:
    return next(p for p, m in model.named_modules() if m is module)


def _tied_pairs(skeleton: nn.Module) -> list[tuple[str, str]]:
    """``(input embedding path, output layer path)`` when their weights are one tensor."""
    try:
        inp, out = skeleton.get_input_embeddings(), skeleton.get_output_embeddings()
    except (AttributeError, NotImplementedError):
        return []
    if inp is None or out is None or out.weight is not inp.weight:
        return []
    names = {id(m): p for p, m in skeleton.named_modules()}
    return [(names[id(inp)], names[id(out)])]


def merge_adapter(base: str, adapter: str, output: str, *, dtype: str | None = None,
                  trust_remote_code: bool = False) -> MergeReport:
    """Merge ``adapter`` into ``base`` and write a standalone model folder to ``output``.

    Args:
        base: Local folder or Hub id of the base model (safetensors), dense or bitsandbytes-quantized.
        adapter: Adapter folder or Hub id (hf_lora or PEFT files).
        output: New folder; must not exist (or be empty). Written under a temporary name, then renamed.
        dtype: ``bf16``, ``fp16``, ``fp32`` or None to keep each tensor's dtype (a quantized
            weight becomes the dtype it was quantized from).
        trust_remote_code: Allow the base repo's own modelling code when building the skeleton.

    Raises:
        ValueError: bad dtype, missing folders, adapter keys that do not fit the base, an output
            folder that already has files, or a merge that would produce NaN/inf.
    """
    from transformers import AutoConfig

    from .model import LoRAModelWrapper

    started = time.perf_counter()
    out_dtype = parse_dtype(dtype)
    target = Path(output)
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise ValueError(f"Output folder {output!r} already exists and is not empty; choose a new folder.")
    base_folder = resolve_base_folder(base)
    adapter_folder = resolve_adapter_folder(adapter, revision=None, token=None, subfolder=None)
    config = AutoConfig.from_pretrained(str(base_folder), trust_remote_code=trust_remote_code)
    quant = getattr(config, "quantization_config", None)
    quant = quant.to_dict() if hasattr(quant, "to_dict") else quant
    adapter_config = read_config(adapter_folder)
    vocab = _grow_vocab(config, adapter_config.trainable_token_indices)
    skeleton = _skeleton(config, trust_remote_code)
    tied = _tied_pairs(skeleton)
    grow = {f"{_path(skeleton, m)}.weight" for m in (skeleton.get_input_embeddings(), skeleton.get_output_embeddings())
            if vocab and m is not None}
    # As when loading: the adapter was already initialised, so no init may rewrite the base.
    lora_config = drop_absent_modules_to_save(adapter_config, skeleton, str(adapter_folder))
    wrapper = LoRAModelWrapper(skeleton, without_base_init(lora_config))
    _materialize_adapter(wrapper, drop_duplicate_head_keys(read_tensors(adapter_folder)), str(adapter_folder))
    root, params = wrapper.base_model, wrapper.adapter_parameters()
    _refuse_tied_changes(root, tied)
    to_merge = {p for p, m in root.named_modules() if isinstance(m, LoRALayer)}

    target.parent.mkdir(parents=True, exist_ok=True)
    staging = staging_folder(target)  # hidden, normal permissions; renamed into place when complete
    try:
        written, merged_layers, dequantized, weight_map = 0, set(), 0, {}
        shards = _shards(base_folder)
        for shard in shards:
            out: dict[str, torch.Tensor] = {}
            for key, tensor, was_quantized in _read_shard(base_folder / shard, quant):
                dequantized += was_quantized
                if key in grow and tensor.shape[0] < vocab:  # rows for tokens added after the base was saved
                    tensor = torch.cat([tensor, tensor.new_zeros((vocab - tensor.shape[0], *tensor.shape[1:]))])
                value, changed = _merged_tensor(root, key, tensor, params)
                if changed and key.endswith(".weight"):
                    merged_layers.add(key.rpartition(".")[0])
                keep = tensor.dtype if not was_quantized else _quantized_from(quant, config)
                value = value.to(out_dtype or keep) if value.is_floating_point() else value
                if changed and value.is_floating_point() and not all_finite(value):
                    raise ValueError(f"Merged tensor {key!r} holds NaN or inf in {str(value.dtype).replace('torch.', '')} "
                                     "(the adapter is non-finite or the sum overflows that dtype); merge to a wider "
                                     "one with --dtype fp32 or bf16.")
                out[key] = value.contiguous()
                weight_map[key] = shard
            atomic_write(staging / shard, lambda tmp, out=out: save_file(out, tmp, metadata={"format": "pt"}))
            written += len(out)
            del out
        unmerged = sorted(to_merge - merged_layers)
        if unmerged:
            raise ValueError(f"The base checkpoint has no weight for adapted layers {unmerged[:3]}; "
                             "is the adapter for this base model?")
        if len(shards) > 1:
            index = {"metadata": {"total_size": sum((staging / s).stat().st_size for s in shards)}, "weight_map": weight_map}
            atomic_write(staging / _INDEX, lambda tmp: Path(tmp).write_text(json.dumps(index, indent=2) + "\n"))
        _write_side_files(base_folder, adapter_folder, staging, out_dtype, vocab)
        os.replace(staging, target) if not target.exists() else _move_into(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return MergeReport(str(target), len(merged_layers), written, len(shards),
                       str(out_dtype or "kept").replace("torch.", ""), dequantized, time.perf_counter() - started)


def _refuse_tied_changes(root: nn.Module, tied: list[tuple[str, str]]) -> None:
    for pair in tied:
        for path in pair:
            module = root.get_submodule(path)
            if isinstance(module, (LoRALayer, TrainedCopy)):
                raise ValueError(
                    f"{path!r} is adapted but its weight is tied to {[p for p in pair if p != path][0]!r}; a streaming "
                    "merge would change both. Merge in memory instead: model.merge_and_unload() (it unties them).")


def _read_shard(path: Path, quant: dict[str, Any] | None) -> Iterator[tuple[str, torch.Tensor, bool]]:
    """Dense tensors of one shard, one at a time; quantization side tensors are folded in."""
    with safe_open(str(path), framework="pt") as handle:
        keys = set(handle.keys())
        for key in sorted(keys):
            if quant and _QUANT_SUFFIX.search(key):
                continue
            tensor, was_quantized = _dequantize(key, handle, keys, quant)
            yield key, tensor, was_quantized


def _quantized_from(quant: dict[str, Any] | None, config: Any) -> torch.dtype:
    """The dtype a quantized weight is restored to: the model's own dtype, else bf16."""
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    return dtype if isinstance(dtype, torch.dtype) and dtype.is_floating_point else torch.bfloat16


def _write_side_files(base: Path, adapter: Path, staging: Path, out_dtype: torch.dtype | None, vocab: int) -> None:
    """config.json without quantization, plus generation and tokenizer files (the adapter's tokenizer wins)."""
    for source in (base, adapter):
        for item in source.iterdir():
            skip = item.name.endswith(_WEIGHT_FILES) or item.name in (_INDEX, "adapter_config.json", "README.md")
            if item.is_file() and not skip and (source is base or "token" in item.name or item.suffix == ".jinja"):
                shutil.copyfile(item, staging / item.name)
    config = json.loads((base / "config.json").read_text())
    config.pop("quantization_config", None)
    if vocab:
        (config.get("text_config") or config)["vocab_size"] = vocab
    if out_dtype is not None:
        config["dtype"] = str(out_dtype).replace("torch.", "")
    atomic_write(staging / "config.json", lambda tmp: Path(tmp).write_text(json.dumps(config, indent=2) + "\n"))


def _move_into(staging: Path, target: Path) -> None:
    """``target`` exists and is empty: replace it by the staging folder."""
    target.rmdir()
    os.replace(staging, target)
