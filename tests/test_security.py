"""Security: no unpickling, no remote code, no path escapes, no tokens on disk, no memory bombs."""

from __future__ import annotations

import logging
import os
import re
import time
from pathlib import Path

import pytest
import torch
from conftest import make_llama

from hf_lora import LoRAConfig, LoRAModelWrapper, wrap
from hf_lora.safe_io import check_relative_name, safe_join

ROOT = Path(__file__).resolve().parents[1]
CONFIG = LoRAConfig(r=4, lora_alpha=8, target_modules=["attention"])
TOKEN = "hf_SECRETsecret0123456789abcdefSECRET"


def _saved_adapter(folder: Path) -> Path:
    wrap(make_llama(), CONFIG).save_pretrained(str(folder))
    return folder


def _module_types(model: torch.nn.Module) -> list[type]:
    return [type(m) for m in model.modules()]


# --- pickles -----------------------------------------------------------------------------------


class _Payload:
    """Unpickling this runs code: it writes the marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "code ran"))


def _malicious_bin(folder: Path, marker: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "adapter_model.bin"
    torch.save({"base_model.model.x.lora_A.weight": torch.zeros(1), "payload": _Payload(marker)}, path)
    return path


def test_malicious_legacy_bin_is_refused_and_runs_nothing(tmp_path):
    adapter = _saved_adapter(tmp_path / "adapter")
    (adapter / "adapter_model.safetensors").unlink()
    marker = tmp_path / "pwned"
    bin_path = _malicious_bin(adapter, marker)
    model = make_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"adapter_model\.bin: cannot be read safely .*Unsupported global"):
        LoRAModelWrapper.from_pretrained(model, str(adapter))
    assert not marker.exists()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    # Control: the payload is live; an unsafe load would have run it.
    torch.load(bin_path, weights_only=False)
    assert marker.read_text() == "code ran"


def test_safetensors_is_preferred_and_a_bin_beside_it_is_never_opened(tmp_path):
    adapter = _saved_adapter(tmp_path / "adapter")
    marker = tmp_path / "pwned"
    _malicious_bin(adapter, marker)
    LoRAModelWrapper.from_pretrained(make_llama(), str(adapter))
    assert not marker.exists()


def _python_sources() -> list[Path]:
    return sorted([*ROOT.joinpath("hf_lora").rglob("*.py"), *ROOT.joinpath("recipes").rglob("*.py")])


def test_sources_never_unpickle_or_trust_remote_code_on_the_users_behalf():
    sources = _python_sources()
    assert len(sources) > 10
    problems = []
    for path in sources:
        text = path.read_text(encoding="utf-8")
        for number, line in enumerate(text.splitlines(), 1):
            code = line.split("#", 1)[0]
            where = f"{path.relative_to(ROOT)}:{number}: {line.strip()}"
            if re.search(r"trust_remote_code\s*=\s*True", code):
                problems.append("trust_remote_code=True " + where)
            if re.search(r"\btorch\.load\(", code) and "weights_only=True" not in code:
                problems.append("torch.load without weights_only=True " + where)
            if re.search(r"\b(pickle|dill|cloudpickle|joblib)\.loads?\(|(?<![.\w])(exec|eval)\(|__import__\(", code):
                problems.append("unpickling or code execution " + where)
    assert problems == []


def test_hub_download_fetches_only_adapter_files_and_runs_no_repo_code(tmp_path, monkeypatch):
    """A downloaded repo may hold code and pickles; only the three adapter files are asked for."""
    import huggingface_hub

    snapshot = _saved_adapter(tmp_path / "snapshot")
    marker = tmp_path / "pwned"
    (snapshot / "__init__.py").write_text(f"open({str(marker)!r}, 'w').write('code ran')\n")
    (snapshot / "modeling_evil.py").write_text(f"open({str(marker)!r}, 'w').write('code ran')\n")
    calls = []

    def fake_snapshot_download(repo_id, **kwargs):
        calls.append((repo_id, kwargs))
        return str(snapshot)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    LoRAModelWrapper.from_pretrained(make_llama(), "someone/adapter", token=TOKEN)
    (repo_id, kwargs), = calls
    assert repo_id == "someone/adapter" and kwargs["token"] == TOKEN
    assert sorted(kwargs["allow_patterns"]) == ["adapter_config.json", "adapter_model.bin", "adapter_model.safetensors"]
    assert "trust_remote_code" not in kwargs
    assert not marker.exists()


# --- path escapes --------------------------------------------------------------------------------

ESCAPES = ["..", "../outside", "a/../../outside", "/etc", "/tmp/x", "\\\\server\\share", "..\\outside", "C:\\x",
           "C:x", "a\x00b", ""]


@pytest.mark.parametrize("name", ESCAPES)
def test_unsafe_relative_names_are_refused(name):
    with pytest.raises(ValueError, match=r"subfolder=.* is invalid"):
        check_relative_name(name, what="subfolder")


@pytest.mark.parametrize("name", ["..", "../outside", "a/../../outside", "/tmp", "..\\outside"])
def test_from_pretrained_subfolder_cannot_leave_the_folder(tmp_path, name, monkeypatch):
    import huggingface_hub

    root = tmp_path / "repo"
    _saved_adapter(tmp_path / "outside")
    _saved_adapter(root / "inner")
    model = make_llama()
    types = _module_types(model)
    with pytest.raises(ValueError, match=r"subfolder=.* is invalid"):
        LoRAModelWrapper.from_pretrained(model, str(root), subfolder=name)
    downloads = []
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda *a, **k: downloads.append(k) or str(root))
    with pytest.raises(ValueError, match=r"subfolder=.* is invalid"):
        LoRAModelWrapper.from_pretrained(model, "someone/adapter", subfolder=name)
    assert downloads == []  # refused before anything is fetched
    assert _module_types(model) == types
    LoRAModelWrapper.from_pretrained(make_llama(), str(root), subfolder="inner")  # a safe subfolder works


def test_subfolder_symlink_leading_outside_is_refused(tmp_path, monkeypatch):
    import huggingface_hub

    outside = _saved_adapter(tmp_path / "outside")
    root = tmp_path / "repo"
    root.mkdir()
    (root / "link").symlink_to(outside, target_is_directory=True)
    with pytest.raises(ValueError, match=r"subfolder='link' resolves to .*outside.*, outside .*repo"):
        LoRAModelWrapper.from_pretrained(make_llama(), str(root), subfolder="link")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda *a, **k: str(root))
    with pytest.raises(ValueError, match=r"subfolder='link' resolves to"):
        LoRAModelWrapper.from_pretrained(make_llama(), "someone/adapter", subfolder="link")


def test_hub_cache_layout_with_file_symlinks_still_loads(tmp_path, monkeypatch):
    """The Hub cache links snapshot files to ../../blobs: file symlinks are fine, only folders are checked."""
    import huggingface_hub

    adapter = _saved_adapter(tmp_path / "saved")
    blobs, snapshot = tmp_path / "cache" / "blobs", tmp_path / "cache" / "snapshots" / "abc" / "sub"
    blobs.mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for file in adapter.iterdir():
        (blobs / file.name).write_bytes(file.read_bytes())
        (snapshot / file.name).symlink_to(os.path.relpath(blobs / file.name, snapshot))
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda *a, **k: str(snapshot.parent))
    LoRAModelWrapper.from_pretrained(make_llama(), "someone/adapter", subfolder="sub")


def test_safe_join_keeps_names_inside(tmp_path):
    assert safe_join(tmp_path, "a/b") == tmp_path / "a" / "b"
    (tmp_path / "out").symlink_to("/", target_is_directory=True)
    with pytest.raises(ValueError, match=r"adapter name='out' resolves to '/', outside"):
        safe_join(tmp_path, "out", what="adapter name")


@pytest.mark.parametrize("name", ["..", "../x", "/abs", "a/b", "a\\b", "."])
def test_adapter_names_cannot_become_paths(tmp_path, name):
    model = wrap(make_llama(), CONFIG)
    with pytest.raises(ValueError, match="adapter name"):
        model.load_adapter(str(_saved_adapter(tmp_path / "adapter")), adapter_name=name)
    assert sorted(os.listdir(tmp_path)) == ["adapter"]


# --- tokens ------------------------------------------------------------------------------------


def _all_bytes(root: Path) -> dict[str, bytes]:
    return {str(p): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def test_push_adapter_never_writes_the_token(tmp_path, monkeypatch, caplog, capsys):
    import huggingface_hub

    from hf_lora.hub import push_adapter

    uploaded: dict[str, bytes] = {}
    tokens_seen = []

    class FakeApi:
        def __init__(self, token=None, **kwargs):
            tokens_seen.append(token)

        def create_repo(self, repo_id, **kwargs):
            return f"https://hub/{repo_id}"

        def upload_folder(self, folder_path, **kwargs):
            uploaded.update(_all_bytes(Path(folder_path)))
            return "https://hub/commit/1"

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    monkeypatch.setenv("TMPDIR", str(tmp_path))  # every temporary file lands where we can scan it
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    model = wrap(make_llama(), CONFIG)
    with caplog.at_level(logging.DEBUG):
        push_adapter(model, "me/adapter", token=TOKEN, metrics={"loss": 1.0})
        model.save_pretrained(str(tmp_path / "local"))
    assert tokens_seen == [TOKEN]  # handed to huggingface_hub, nowhere else
    assert sorted(Path(p).name for p in uploaded) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    written = {**uploaded, **_all_bytes(tmp_path)}
    assert written and not [p for p, data in written.items() if TOKEN.encode() in data]
    out = capsys.readouterr()
    assert TOKEN not in caplog.text + out.out + out.err


# --- memory bombs --------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, match", [
    ({"r": 2**30}, r"r=1073741824 for module .* exceeds its smallest dimension \(\d+\)"),
    ({"r": 4, "rank_pattern": {"q_proj": 10**6}}, r"r=1000000 for module 'model\.layers\.0\.self_attn\.q_proj' exceeds"),
    ({"r": 65, "target_modules": ["embed_tokens"]}, r"r=65 for module 'model\.embed_tokens' exceeds its smallest dimension \(64\)"),
    ({"r": 2**31}, r"LoRAConfig\.r=2147483648 is invalid"),
    ({"target_modules": [f"m{i}" for i in range(10_001)]}, r"target_modules=.*at most 10000 entries"),
])
def test_memory_bombs_are_refused_before_allocating(kwargs, match):
    model = make_llama()
    types = _module_types(model)
    start = time.perf_counter()
    # r=2**30 on a 64-wide layer would need 256 GiB: reaching the allocator would crash or swap.
    with pytest.raises(ValueError, match=match):
        wrap(model, LoRAConfig(**{"target_modules": ["attention"], **kwargs}))
    assert time.perf_counter() - start < 2.0
    assert _module_types(model) == types


def test_load_adapter_subfolder_cannot_leave_the_folder(tmp_path):
    root = tmp_path / "repo"
    _saved_adapter(root / "inner")
    _saved_adapter(tmp_path / "outside")
    model = wrap(make_llama(), CONFIG)
    with pytest.raises(ValueError, match=r"subfolder='\.\./outside' is invalid: '\.\.' would leave"):
        model.load_adapter(str(root), adapter_name="second", subfolder="../outside")
    assert list(model.adapters) == ["default"]
    model.load_adapter(str(root), adapter_name="second", subfolder="inner")
    assert sorted(model.adapters) == ["default", "second"]


def test_saving_adapters_refuses_a_symlink_named_like_an_adapter(tmp_path):
    model = wrap(make_llama(), CONFIG)
    model.load_adapter(str(_saved_adapter(tmp_path / "adapter")), adapter_name="second")
    out, elsewhere = tmp_path / "out", tmp_path / "elsewhere"
    out.mkdir()
    elsewhere.mkdir()
    (out / "second").symlink_to(elsewhere, target_is_directory=True)
    with pytest.raises(ValueError, match=r"adapter name='second' resolves to .*elsewhere.*, outside .*out"):
        model.save_pretrained(str(out))
    assert list(elsewhere.iterdir()) == []
    (out / "second").unlink()
    model.save_pretrained(str(out))
    assert (out / "second" / "adapter_model.safetensors").is_file()


def test_merge_never_runs_code_shipped_with_the_base(tmp_path):
    """A base folder whose config.json points at its own Python code (auto_map) is merged with the
    library's classes; the shipped module is never imported unless --trust-remote-code is given."""
    import json

    from hf_lora.merge import merge_adapter

    base = tmp_path / "base"
    make_llama().save_pretrained(str(base))
    marker = tmp_path / "pwned"
    for name in ("evil.py", "__init__.py"):
        (base / name).write_text(f"open({str(marker)!r}, 'w').write('code ran')\n")
    config = json.loads((base / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel"}
    (base / "config.json").write_text(json.dumps(config))
    adapter = _saved_adapter(tmp_path / "adapter")
    merge_adapter(str(base), str(adapter), str(tmp_path / "merged"))
    assert (tmp_path / "merged" / "config.json").is_file()
    assert not marker.exists()
