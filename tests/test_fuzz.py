"""Fuzz adapter files: every bad file ends in a ValueError naming the file, the model untouched.

Each example damages a valid adapter folder (``adapter_config.json`` or
``adapter_model.safetensors``), loads it onto a fresh copy of the base model and checks:
the outcome is success or a ``ValueError`` whose message names the folder and the file;
after a failure every base tensor, module class and ``requires_grad`` flag is exactly as
before; no load takes more than a few seconds. The counts are printed (``pytest -s``).
"""

from __future__ import annotations

import copy
import json
import math
import struct
import tempfile
import time
import warnings
from collections import Counter
from pathlib import Path

import pytest
import torch
from conftest import make_llama
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from hf_lora import LoRAConfig, LoRAModelWrapper, wrap

CONFIG_NAME, WEIGHTS_NAME = "adapter_config.json", "adapter_model.safetensors"
SETTINGS = settings(max_examples=300, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
MAX_SECONDS = 10.0


@pytest.fixture(scope="module")
def adapter():
    """A valid adapter folder's content (config dict, tensors) and the base it belongs to."""
    base = make_llama()
    model = wrap(copy.deepcopy(base), LoRAConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"],
                                                 init_lora_weights=False))
    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder)
        config = json.loads((Path(folder) / CONFIG_NAME).read_text())
        tensors = load_file(str(Path(folder) / WEIGHTS_NAME))
    return base, config, tensors


def _state(model: torch.nn.Module) -> tuple[dict[str, torch.Tensor], list[tuple[str, type]], dict[str, bool]]:
    if isinstance(model, LoRAModelWrapper):  # its state_dict holds the active adapter only: look at everything
        return (*_state(model.get_base_model()), sorted(model.adapters), model.active_adapter)
    return (
        {k: v.detach().clone() for k, v in model.state_dict().items()},
        [(name, type(module)) for name, module in model.named_modules()],
        {name: p.requires_grad for name, p in model.named_parameters()},
    )


def _same_state(before, after) -> bool:
    tensors_a, modules_a, flags_a, *rest_a = before
    tensors_b, modules_b, flags_b, *rest_b = after
    return (
        rest_a == rest_b and
        tensors_a.keys() == tensors_b.keys()
        and all(torch.equal(tensors_a[k], tensors_b[k]) for k in tensors_a)
        and modules_a == modules_b
        and flags_a == flags_b
    )


def _load(base: torch.nn.Module, folder: Path, damaged: str, stats: Counter) -> None:
    """Load ``folder`` onto a copy of ``base`` and check the outcome (see module docstring).

    A plain base gets ``from_pretrained``; a wrapped one gets ``load_adapter`` (a second adapter).
    """
    model = copy.deepcopy(base)
    before = _state(model)
    start = time.perf_counter()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if isinstance(model, LoRAModelWrapper):
                model.load_adapter(str(folder), adapter_name="second")
            else:
                LoRAModelWrapper.from_pretrained(model, str(folder))
    except ValueError as exc:
        message = str(exc)
        assert str(folder) in message, f"error does not name the folder: {message}"
        assert CONFIG_NAME in message or WEIGHTS_NAME in message, f"error does not name the file: {message}"
        assert _same_state(before, _state(model)), f"failed load changed the model: {message}"
        stats[f"ValueError ({'config' if CONFIG_NAME in message else 'weights'} named)"] += 1
    else:
        stats["loaded"] += 1
    elapsed = time.perf_counter() - start
    stats["max_seconds"] = max(stats["max_seconds"], elapsed)
    assert elapsed < MAX_SECONDS, f"load took {elapsed:.1f} s"
    stats[f"damaged {damaged}"] += 1


def _report(name: str, stats: Counter, capsys: pytest.CaptureFixture) -> int:
    total = stats["loaded"] + sum(v for k, v in stats.items() if k.startswith("ValueError"))
    details = ", ".join(f"{k}: {v}" for k, v in sorted(stats.items()) if k != "max_seconds")
    with capsys.disabled():  # the counts belong in every test log, not only with -s
        print(f"\n{name}: {total} cases ({details}); slowest load {stats['max_seconds'] * 1e3:.0f} ms")
    return total


# --- adapter_config.json -------------------------------------------------------------------------

json_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70),
    st.sampled_from([0, -1, 2**63, 10**400, -(10**400)]),
    st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([math.nan, math.inf, -math.inf, 1e308, 5e-324]),
    st.text(max_size=20), st.sampled_from(["q_proj", "attention", "all-linear", "(", "*", "LORA", "gaussian", ""]),
)
json_values = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
                           max_leaves=8)
FIELDS = ["r", "lora_alpha", "lora_dropout", "target_modules", "exclude_modules", "bias", "use_rslora",
          "init_lora_weights", "rank_pattern", "alpha_pattern", "modules_to_save", "fan_in_fan_out", "task_type",
          "peft_type", "use_dora", "lora_bias", "layers_to_transform", "trainable_token_indices", "hf_lora_base",
          "base_model_name_or_path", "revision"]


@st.composite
def config_bytes(draw, config: dict) -> tuple[str, bytes]:
    kind = draw(st.sampled_from(["set", "set", "set", "delete", "unknown", "top-level", "raw", "truncate", "nested"]))
    data = copy.deepcopy(config)
    if kind == "set":
        field = draw(st.sampled_from(FIELDS))
        data[field] = draw(json_values)
        return f"config field {field}", json.dumps(data).encode()
    if kind == "delete":
        for field in draw(st.lists(st.sampled_from(sorted(data)), min_size=1, max_size=4)):
            data.pop(field, None)
        return "config fields deleted", json.dumps(data).encode()
    if kind == "unknown":
        data.update(draw(st.dictionaries(st.text(min_size=1, max_size=12), json_values, min_size=1, max_size=3)))
        return "config unknown fields", json.dumps(data).encode()
    if kind == "top-level":
        return "config not an object", json.dumps(draw(json_values)).encode()
    if kind == "nested":
        depth = draw(st.sampled_from([50, 5000, 200000]))
        data["target_modules"] = "DEPTH"
        return "config deep nesting", json.dumps(data).replace('"DEPTH"', "[" * depth + "]" * depth).encode()
    text = json.dumps(data).encode()
    if kind == "truncate":
        return "config truncated", text[: draw(st.integers(0, len(text) - 1))]
    return "config raw bytes", draw(st.binary(max_size=64)) + draw(st.sampled_from([b"", b"\xff\xfe", b"\xc3\x28", text[:20]]))


def _hostile_configs(config: dict) -> list[tuple[str, bytes]]:
    """Cases found or feared by hand, always run on top of the random ones."""
    cases = [("lora_alpha", 10**400), ("r", 10**400), ("r", 10**12), ("rank_pattern", {"q_proj": 2**64}),
             ("alpha_pattern", {"v_proj": 1e309}), ("lora_dropout", math.nan), ("target_modules", ["q_proj"] * 100_000),
             ("target_modules", [f"m{i}" for i in range(20_000)]), ("exclude_modules", "("),
             ("modules_to_save", ["lm_head", "nothing_like_this"]), ("init_lora_weights", "pissa"),
             # exponential-time regexes: must be refused, not hang
             ("rank_pattern", {"(.*)*x": 2}), ("alpha_pattern", {"(.|.)*y": 3.0}), ("target_modules", r"(\w+\.?)*z"),
             ("layers_pattern", "(a+)+$"),
             # token rows beyond the vocabulary would grow the base before the weights are checked
             ("trainable_token_indices", [3]), ("trainable_token_indices", [300]), ("trainable_token_indices", [2**40]),
             ("trainable_token_indices", [2**31 - 2])]  # 512 GiB of embedding rows: refused before allocating
    out = [(f"config field {k}", json.dumps({**config, k: v}).encode()) for k, v in cases]
    out.append(("config huge integer", json.dumps(config).replace('"r": 4', '"r": ' + "9" * 5000).encode()))
    out.append(("config deep nesting", json.dumps(config).replace('["q_proj"', "[" * 10**6 + "]" * 10**6 + ', ["q_proj"').encode()))
    out.append(("config raw bytes", b"\xff" + json.dumps(config).encode()))
    return out


def test_fuzz_adapter_config(adapter, capsys):
    base, config, tensors = adapter
    stats: Counter = Counter()
    with tempfile.TemporaryDirectory() as root:
        folder = Path(root) / "adapter"
        folder.mkdir()
        save_file(tensors, str(folder / WEIGHTS_NAME))

        def check(case: tuple[str, bytes]) -> None:
            damaged, content = case
            (folder / CONFIG_NAME).write_bytes(content)
            _load(base, folder, damaged.split(" field ")[0], stats)

        for case in _hostile_configs(config):
            check(case)
        SETTINGS(given(case=config_bytes(config))(check))()
    total = _report("adapter_config.json fuzz", stats, capsys)
    assert total >= 100 and stats["loaded"] > 0
    assert sum(v for k, v in stats.items() if k.startswith("ValueError")) > total // 2


# --- adapter_model.safetensors ------------------------------------------------------------------

DTYPES = [torch.int32, torch.int64, torch.uint8, torch.bool, torch.float16, torch.bfloat16, torch.float64,
          torch.float8_e4m3fn, torch.complex64]


def _serialise(tensors: dict[str, torch.Tensor]) -> bytes:
    from safetensors.torch import save

    return save(tensors, metadata={"format": "pt"})


@st.composite
def weights_bytes(draw, tensors: dict[str, torch.Tensor]) -> tuple[str, bytes]:
    kind = draw(st.sampled_from(["truncate", "header length", "header bytes", "dtype", "shape", "extra key",
                                 "missing key", "non-finite", "empty", "garbage"]))
    keys = sorted(tensors)
    data = dict(tensors)
    if kind == "dtype":
        key, dtype = draw(st.sampled_from(keys)), draw(st.sampled_from(DTYPES))
        data[key] = data[key].to(dtype)
    elif kind == "shape":
        key = draw(st.sampled_from(keys))
        rows, cols = data[key].shape
        shape = draw(st.sampled_from([(cols, rows), (rows + 1, cols), (rows, cols - 1), (rows * cols,), (1, rows, cols), ()]))
        data[key] = torch.zeros(shape) if shape != (cols, rows) or rows != cols else torch.zeros(rows + 1, cols)
    elif kind == "extra key":
        name = draw(st.one_of(st.text(min_size=1, max_size=30), st.sampled_from([
            "base_model.model.model.layers.0.self_attn.k_proj.lora_A.weight", "base_model.model.lm_head.weight",
            "base_model.model.", "base_model.model.model.norm.weight", "base_model.model.model.layers.9.x"])))
        data[name] = torch.zeros(draw(st.sampled_from([(1,), (4, 64), (256, 64), (64,)])))
    elif kind == "missing key":
        for key in draw(st.lists(st.sampled_from(keys), min_size=1, max_size=3, unique=True)):
            data.pop(key)
    elif kind == "non-finite":
        key = draw(st.sampled_from(keys))
        data[key] = data[key].clone()
        data[key].view(-1)[draw(st.integers(0, data[key].numel() - 1))] = draw(st.sampled_from([math.nan, math.inf, -math.inf]))
    elif kind == "empty":
        return kind, b""
    elif kind == "garbage":
        return kind, draw(st.binary(max_size=256))
    blob = _serialise(data)
    if kind == "truncate":
        return kind, blob[: draw(st.integers(0, len(blob) - 1))]
    if kind == "header length":
        value = draw(st.one_of(st.integers(0, 2**64 - 1), st.sampled_from([0, 1, 2**63, len(blob), len(blob) - 8])))
        return kind, struct.pack("<Q", value) + blob[8:]
    if kind == "header bytes":
        (length,) = struct.unpack("<Q", blob[:8])
        position = draw(st.integers(8, 8 + length - 1))
        return kind, blob[:position] + bytes([draw(st.integers(0, 255))]) + blob[position + 1:]
    return kind, blob


def test_fuzz_adapter_weights(adapter, capsys):
    base, config, tensors = adapter
    stats: Counter = Counter()
    with tempfile.TemporaryDirectory() as root:
        folder = Path(root) / "adapter"
        folder.mkdir()
        (folder / CONFIG_NAME).write_text(json.dumps(config))

        def check(case: tuple[str, bytes]) -> None:
            damaged, content = case
            (folder / WEIGHTS_NAME).write_bytes(content)
            _load(base, folder, damaged, stats)

        SETTINGS(given(case=weights_bytes(tensors))(check))()
    total = _report("adapter_model.safetensors fuzz", stats, capsys)
    assert total >= 100
    assert sum(v for k, v in stats.items() if k.startswith("ValueError")) > total // 2


def test_fuzz_load_adapter_into_a_wrapped_model(adapter, capsys):
    """The same damaged files loaded as a second adapter: the wrapped model and its adapters stay as they were."""
    base, config, tensors = adapter
    wrapped = wrap(copy.deepcopy(base), LoRAConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"]))
    stats: Counter = Counter()
    small = settings(SETTINGS, max_examples=100)
    with tempfile.TemporaryDirectory() as root:
        folder = Path(root) / "adapter"
        folder.mkdir()

        def check_config(case: tuple[str, bytes]) -> None:
            save_file(tensors, str(folder / WEIGHTS_NAME))
            (folder / CONFIG_NAME).write_bytes(case[1])
            _load(wrapped, folder, case[0].split(" field ")[0], stats)

        def check_weights(case: tuple[str, bytes]) -> None:
            (folder / CONFIG_NAME).write_text(json.dumps(config))
            (folder / WEIGHTS_NAME).write_bytes(case[1])
            _load(wrapped, folder, case[0], stats)

        for case in _hostile_configs(config):
            check_config(case)
        small(given(case=config_bytes(config))(check_config))()
        small(given(case=weights_bytes(tensors))(check_weights))()
    total = _report("load_adapter fuzz", stats, capsys)
    assert total >= 150 and stats["loaded"] > 0
