"""Crashes and full disks: SIGKILL during saves and training, read-only and full output folders."""

from __future__ import annotations

import copy
import errno
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import make_llama
from safetensors.torch import load_file

from hf_lora import LoRAConfig, LoRAModelWrapper, wrap
from hf_lora import checkpoint as ckpt
from hf_lora.resume import (
    INCOMPLETE_PREFIX,
    checkpoint_problem,
    last_complete_checkpoint,
    set_aside_incomplete_checkpoints,
)
from hf_lora.safe_io import TEMP_SUFFIX, atomic_write

TESTS = Path(__file__).parent
FILES = ("adapter_config.json", "adapter_model.safetensors", "README.md")
CONFIG = LoRAConfig(r=4, lora_alpha=8, target_modules=["attention"])


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {name: (folder / name).read_bytes() for name in FILES}


def _temps(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(TEMP_SUFFIX))


def _saved(tmp_path: Path) -> tuple[LoRAModelWrapper, Path]:
    model = wrap(make_llama(), LoRAConfig(r=4, lora_alpha=8, target_modules=["attention"], init_lora_weights=False))
    folder = tmp_path / "adapter"
    model.save_pretrained(str(folder))
    return model, folder


# --- SIGKILL during save_pretrained ------------------------------------------------------------


def _ask(proc: subprocess.Popen, line: str, expect: str) -> str:
    proc.stdin.write(line + "\n")
    proc.stdin.flush()
    answer = proc.stdout.readline().strip()
    assert answer.startswith(expect), (answer, proc.stderr.read() if proc.poll() is not None else "")
    return answer[len(expect):].strip()


@pytest.mark.slow
def test_sigkill_during_save_leaves_previous_or_new_complete_adapter(tmp_path, capsys):
    """Kill a real writer process at random instants inside save_pretrained, many times.

    After every kill the folder must load (``from_pretrained``) and hold exactly one version:
    every tensor equal to one fill value, config and card from a whole save. Leftover
    temporary files are allowed but never read.
    """
    folder = tmp_path / "adapter"
    proc = subprocess.Popen(
        [sys.executable, str(TESTS / "_kill_writer.py"), str(folder)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    kills, versions, mid_save, leftovers = 40, set(), 0, 0
    try:
        ready = proc.stdout.readline().split()
        assert ready and ready[0] == "ready", proc.stderr.read()
        save_seconds = float(ready[1])
        rng = random.Random(0)
        base = make_llama(hidden_size=128, intermediate_size=256)
        expected_config = (folder / "adapter_config.json").read_bytes()
        size = (folder / "adapter_model.safetensors").stat().st_size
        previous = 0.0
        for trial in range(kills):
            first = (trial + 1) * 1_000_000  # this writer writes first, first + 1, ...
            pid = int(_ask(proc, f"fork {first}", "pid "))
            time.sleep(rng.uniform(0, 3 * save_seconds))
            os.kill(pid, signal.SIGKILL)
            assert _ask(proc, f"reap {pid}", "reaped ") == str(int(signal.SIGKILL))
            temps = _temps(folder)
            leftovers += bool(temps)
            mid_save += bool(temps)
            assert (folder / "adapter_config.json").read_bytes() == expected_config
            assert (folder / "adapter_model.safetensors").stat().st_size == size
            loaded = LoRAModelWrapper.from_pretrained(copy.deepcopy(base), str(folder))
            values = {float(v) for p in loaded.adapter_parameters().values() for v in p.detach().unique()}
            assert len(values) == 1, f"kill {trial}: tensors from several saves: {sorted(values)[:5]}"
            value = values.pop()
            assert value == previous or value >= first, (value, previous, first)
            versions.add(value)
            previous = value
    finally:
        if proc.poll() is None:
            proc.stdin.write("quit\n")
            proc.stdin.flush()
            proc.wait(timeout=30)
    with capsys.disabled():  # the counts belong in every test log
        print(f"\nsave kill test: {kills} SIGKILLs, {len(versions)} distinct complete versions loaded, "
              f"{mid_save} kills left temp files (a write was in progress), save takes {save_seconds * 1e3:.1f} ms, "
              f"weights file {size / 1e6:.2f} MB")
    assert len(versions) > 1, "no kill landed after a completed save; the delays are too short"
    assert mid_save > 0, "no kill landed inside a write; the delays are too long"


def _same_files(folder: Path, reference: Path) -> bool:
    names = sorted(p.name for p in reference.iterdir())
    if sorted(p.name for p in folder.iterdir()) != names:
        return False
    for name in names:
        if name.endswith(".safetensors"):
            got, want = load_file(str(folder / name)), load_file(str(reference / name))
            if got.keys() != want.keys() or not all(torch.equal(got[k], want[k]) for k in want):
                return False
        elif (folder / name).read_bytes() != (reference / name).read_bytes():
            return False
    return True


@pytest.mark.slow
def test_sigkill_during_hf_lora_merge_never_leaves_a_partial_output_folder(tmp_path, capsys):
    """Kill `merge_adapter` (what `hf-lora merge` runs) at random instants, 10 times.

    Every output folder that exists afterwards is a whole merge, identical file by file to a
    reference merge; an interrupted one exists only as a hidden ``.<name>.partial-*`` folder,
    and merging into the same name again works.
    """
    from hf_lora.merge import merge_adapter

    proc = subprocess.Popen(
        [sys.executable, str(TESTS / "_kill_writer.py"), str(tmp_path), "merge"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    kills, partial, checked = 10, 0, set()
    try:
        ready = proc.stdout.readline().split()
        assert ready and ready[0] == "ready", proc.stderr.read()
        start = time.perf_counter()
        merge_adapter(str(tmp_path / "base"), str(tmp_path / "adapter"), str(tmp_path / "reference"))
        merge_seconds = time.perf_counter() - start
        rng = random.Random(1)
        out, reference = tmp_path / "out", tmp_path / "reference"
        for trial in range(kills):
            first = trial * 1000
            pid = int(_ask(proc, f"fork {first}", "pid "))
            time.sleep(rng.uniform(0, 3 * merge_seconds))
            os.kill(pid, signal.SIGKILL)
            assert _ask(proc, f"reap {pid}", "reaped ") == str(int(signal.SIGKILL))
            for folder in sorted(out.iterdir()) if out.exists() else []:
                if folder.name.startswith("."):
                    assert ".partial-" in folder.name, folder.name
                elif folder.name not in checked:  # a whole folder never changes afterwards
                    assert _same_files(folder, reference), f"kill {trial}: {folder.name} is not a whole merge"
                    checked.add(folder.name)
            partial = sum(1 for f in out.iterdir() if f.name.startswith(".")) if out.exists() else 0
        victim = out / f"m{first}"  # the last writer's first target: interrupted unless it finished
        if victim.exists():
            victim = out / "again"
        merge_adapter(str(tmp_path / "base"), str(tmp_path / "adapter"), str(victim))
        assert _same_files(victim, reference)
    finally:
        if proc.poll() is None:
            proc.stdin.write("quit\n")
            proc.stdin.flush()
            proc.wait(timeout=30)
    shards = len(list((tmp_path / "reference").glob("*.safetensors")))
    with capsys.disabled():
        print(f"\nmerge kill test: {kills} SIGKILLs, {len(checked)} whole merged folders checked file by file, "
              f"{partial} interrupted merges left only hidden staging folders; merge takes {merge_seconds * 1e3:.0f} ms, "
              f"{shards} shards")
    assert partial > 0, "no kill landed inside a merge; the delays are too short"


def test_leftover_temp_files_are_ignored_by_loading(tmp_path):
    model, folder = _saved(tmp_path)
    expected = {k: v.clone() for k, v in model.adapter_parameters().items()}
    # What a killed writer leaves: staged files with the final names' prefix, half written.
    (folder / f".adapter_model.safetensors.abc{TEMP_SUFFIX}").write_bytes(b"\x00" * 17)
    (folder / f".adapter_config.json.def{TEMP_SUFFIX}").write_text('{"r": 999, "target_')
    loaded = LoRAModelWrapper.from_pretrained(make_llama(), str(folder))
    for key, value in loaded.adapter_parameters().items():
        assert torch.equal(value, expected[key])
    model.save_pretrained(str(folder))  # saving again works beside them
    assert len(_temps(folder)) == 2


def test_weights_saved_with_other_settings_than_the_config_warn(tmp_path):
    """A crash between the renames (or files of two adapters) pairs new weights with an old config."""
    _, folder = _saved(tmp_path)
    config = json.loads((folder / "adapter_config.json").read_text())
    config["lora_alpha"] = 32
    (folder / "adapter_config.json").write_text(json.dumps(config))
    with pytest.warns(UserWarning, match=r"lora_alpha=8 with the weights, 32 in the config"):
        LoRAModelWrapper.from_pretrained(make_llama(), str(folder))


# --- disk full / read-only ---------------------------------------------------------------------


def test_disk_full_names_the_path_and_keeps_previous_adapter(tmp_path, monkeypatch):
    model, folder = _saved(tmp_path)
    before = _snapshot(folder)

    def full_disk(tensors, path, metadata=None):
        Path(path).write_bytes(b"partial")  # what a writer leaves when the disk fills up
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(ckpt, "save_file", full_disk)
    with torch.no_grad():
        next(iter(model.adapter_parameters().values())).add_(1.0)
    with pytest.raises(OSError, match=r"Could not write '.*adapter_model\.safetensors': No space left on device") as info:
        model.save_pretrained(str(folder))
    assert info.value.errno == errno.ENOSPC
    assert _snapshot(folder) == before
    assert _temps(folder) == []


def test_safetensors_io_error_is_reported_as_oserror(tmp_path):
    # safetensors raises SafetensorError("... (os error 28)") on a real full disk; it must become ENOSPC.
    from safetensors import SafetensorError

    def failing(tmp: str) -> None:
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    with pytest.raises(OSError, match=r"Could not write '.*out\.bin': No space left on device") as info:
        atomic_write(tmp_path / "out.bin", failing)
    assert info.value.errno == errno.ENOSPC
    assert list(tmp_path.iterdir()) == []


def test_read_only_folder_names_the_path_and_keeps_previous_adapter(tmp_path, monkeypatch):
    model, folder = _saved(tmp_path)
    before = _snapshot(folder)

    def read_only(*args, **kwargs):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))

    monkeypatch.setattr("tempfile.mkstemp", read_only)
    with pytest.raises(PermissionError, match=r"Could not write '.*adapter_model\.safetensors': Permission denied"):
        model.save_pretrained(str(folder))
    assert _snapshot(folder) == before


def _mount_tmpfs(path: Path, options: str) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    return subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], check=False, capture_output=True).returncode == 0


@pytest.mark.slow
def test_real_full_disk_and_read_only_mount(tmp_path):
    """The same on real file systems: a 64 KB tmpfs that fills up, then a read-only remount."""
    mount = tmp_path / "small"
    if not _mount_tmpfs(mount, "size=64k"):
        pytest.skip("needs root and mount to create a small tmpfs")
    try:
        small = wrap(make_llama(), CONFIG)
        folder = mount / "adapter"
        small.save_pretrained(str(folder))
        before = _snapshot(folder)
        big = wrap(make_llama(), LoRAConfig(r=32, target_modules=["attention", "mlp"]))
        with pytest.raises(OSError, match=r"Could not write '.*adapter_model\.safetensors': No space left") as info:
            big.save_pretrained(str(folder))
        assert info.value.errno == errno.ENOSPC
        assert _snapshot(folder) == before and _temps(folder) == []
        subprocess.run(["mount", "-o", "remount,ro", str(mount)], check=True)
        with pytest.raises(OSError, match=r"Could not write '.*adapter_model\.safetensors': Read-only file system"):
            small.save_pretrained(str(folder))
        assert _snapshot(folder) == before
        LoRAModelWrapper.from_pretrained(make_llama(), str(folder))
    finally:
        subprocess.run(["umount", str(mount)], check=False, capture_output=True)


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root ignores folder permissions")
def test_read_only_folder_by_permissions(tmp_path):
    model, folder = _saved(tmp_path)
    before = _snapshot(folder)
    folder.chmod(0o555)
    try:
        with pytest.raises(PermissionError, match=r"Could not write '.*adapter_model\.safetensors'"):
            model.save_pretrained(str(folder))
    finally:
        folder.chmod(0o755)
    assert _snapshot(folder) == before


# --- Trainer checkpoints -----------------------------------------------------------------------


def _fake_checkpoint(folder: Path, step: int) -> Path:
    from safetensors.torch import save_file

    path = folder / f"checkpoint-{step}"
    path.mkdir(parents=True)
    save_file({"base_model.x": torch.ones(4)}, str(path / "model.safetensors"))
    torch.save({"state": {}}, path / "optimizer.pt")
    (path / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    return path


def test_checkpoint_problem_names_what_is_wrong(tmp_path):
    assert checkpoint_problem(_fake_checkpoint(tmp_path, 2)) is None
    no_state = _fake_checkpoint(tmp_path, 4)
    (no_state / "trainer_state.json").unlink()
    assert "trainer_state.json is missing" in checkpoint_problem(no_state)
    truncated = _fake_checkpoint(tmp_path, 6)
    data = (truncated / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(data[:-3])
    assert "model.safetensors is truncated" in checkpoint_problem(truncated)
    bad_optimizer = _fake_checkpoint(tmp_path, 8)
    (bad_optimizer / "optimizer.pt").write_bytes((bad_optimizer / "optimizer.pt").read_bytes()[:40])
    assert "optimizer.pt is truncated" in checkpoint_problem(bad_optimizer)
    wrong_step = _fake_checkpoint(tmp_path, 10)
    (wrong_step / "trainer_state.json").write_text(json.dumps({"global_step": 9}))
    assert "global_step=9, not 10" in checkpoint_problem(wrong_step)
    no_weights = _fake_checkpoint(tmp_path, 12)
    (no_weights / "model.safetensors").unlink()
    assert "no weights file" in checkpoint_problem(no_weights)


def test_last_complete_checkpoint_skips_incomplete_ones(tmp_path, caplog):
    _fake_checkpoint(tmp_path, 2)
    newest = _fake_checkpoint(tmp_path, 10)
    (newest / "trainer_state.json").unlink()
    assert last_complete_checkpoint(tmp_path / "missing") is None
    with caplog.at_level("WARNING", logger="hf_lora.resume"):
        assert last_complete_checkpoint(tmp_path) == str(tmp_path / "checkpoint-2")
    assert f"Skipping incomplete checkpoint {newest}: trainer_state.json is missing" in caplog.text
    moved = set_aside_incomplete_checkpoints(tmp_path)
    assert moved == [tmp_path / f"{INCOMPLETE_PREFIX}checkpoint-10"] and moved[0].is_dir()
    from transformers.trainer_utils import get_last_checkpoint

    assert get_last_checkpoint(str(tmp_path)) == str(tmp_path / "checkpoint-2")


TRAIN_CHILD = TESTS / "_train_child.py"


def _train(out: Path, *, resume: bool, pause_step: int = 0, pause_train_step: int = 0) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, str(TRAIN_CHILD), str(TESTS), str(out), "1" if resume else "0", str(pause_step),
         str(pause_train_step)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )


@pytest.mark.slow
def test_training_killed_mid_save_resumes_to_the_same_adapter(tmp_path):
    """SIGKILL a Trainer run inside its step-4 save, resume with resume_from_checkpoint=True.

    The step-4 folder is incomplete (no trainer_state.json): Trainer alone would pick it;
    SkipIncompleteCheckpoints sets it aside and the run resumes from step 2. That run is killed
    again between two checkpoints (after step 5 or 7); the third run resumes from the last
    complete checkpoint and ends with the adapter of an uninterrupted run, bit for bit.
    """
    from transformers.trainer_utils import get_last_checkpoint

    reference, crashed = tmp_path / "reference", tmp_path / "crashed"
    uninterrupted = _train(reference, resume=False)
    killed = _train(crashed, resume=False, pause_step=4)
    deadline = time.monotonic() + 240
    while not (crashed / "PAUSED").exists():
        assert killed.poll() is None and time.monotonic() < deadline, killed.stdout.read()
        time.sleep(0.05)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert "trainer_state.json is missing" in checkpoint_problem(crashed / "checkpoint-4")
    assert get_last_checkpoint(str(crashed)) == str(crashed / "checkpoint-4")  # what Trainer would load
    (crashed / "PAUSED").unlink()
    # Second crash, between checkpoints: after optimizer step 5 or 7 (drawn), whose work is lost.
    lost_step = random.Random(2).choice([5, 7])
    second = _train(crashed, resume=True, pause_train_step=lost_step)
    while not (crashed / "PAUSED").exists():
        assert second.poll() is None and time.monotonic() < deadline, second.stdout.read()
        time.sleep(0.05)
    second.send_signal(signal.SIGKILL)
    second_log = second.communicate()[0]
    assert "set aside as" in second_log and f"{INCOMPLETE_PREFIX}checkpoint-4" in second_log
    assert "DONE" not in second_log
    assert last_complete_checkpoint(crashed) == str(crashed / f"checkpoint-{lost_step - 1}")
    (crashed / "PAUSED").unlink()
    resumed = _train(crashed, resume=True)
    log = resumed.communicate(timeout=300)[0]
    assert resumed.returncode == 0, log
    reference_log = uninterrupted.communicate(timeout=300)[0]
    assert uninterrupted.returncode == 0, reference_log
    assert "DONE 8" in log and "DONE 8" in reference_log
    expected = load_file(str(reference / "final" / "adapter_model.safetensors"))
    got = load_file(str(crashed / "final" / "adapter_model.safetensors"))
    assert expected.keys() == got.keys() and len(expected) == 16  # q,k,v,o x 2 layers x A,B
    for key in expected:
        assert torch.equal(expected[key], got[key]), key
    b_key = next(k for k in expected if "lora_B" in k)
    assert not torch.equal(expected[b_key], torch.zeros_like(expected[b_key]))  # training moved B


def test_every_file_hf_lora_writes_goes_through_atomic_write():
    """Source guard: a write call in hf_lora/ must target the temporary path atomic_write hands out."""
    writes = re.compile(r"\.write_text\(|\.write_bytes\(|\.savefig\(|\bsave_file\(|\btorch\.save\(|\bopen\([^)]*['\"][wa]b?['\"]")
    offenders = []
    for path in sorted((TESTS.parent / "hf_lora").rglob("*.py")):
        if path.name == "safe_io.py":
            continue
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            code = line.split("#", 1)[0]
            if writes.search(code) and "tmp" not in code:
                offenders.append(f"{path.name}:{number}: {line.strip()}")
    assert offenders == [], "write through hf_lora.safe_io.atomic_write instead:\n" + "\n".join(offenders)


def test_configs_and_wrapped_models_can_be_copied_and_pickled():
    """Read-only mapping fields once made copy.deepcopy(wrapped_model) and pickling raise TypeError."""
    import pickle

    config = LoRAConfig(r=4, target_modules=["q_proj"], rank_pattern={"q_proj": 2}, alpha_pattern={"q_proj": 3.0})
    assert pickle.loads(pickle.dumps(config)) == config == copy.deepcopy(config)
    model = wrap(make_llama(), config)
    clone = copy.deepcopy(model)
    assert clone.lora_config == config and type(clone) is type(model)
    for key, value in pickle.loads(pickle.dumps(model)).adapter_parameters().items():
        assert torch.equal(value, model.adapter_parameters()[key])


@pytest.mark.skipif(os.name != "posix", reason="POSIX file modes")
def test_saved_files_get_the_usual_permissions_not_mkstemps_private_ones(tmp_path):
    previous = os.umask(0o022)
    try:
        _, folder = _saved(tmp_path)
        assert {name: (folder / name).stat().st_mode & 0o777 for name in FILES} == dict.fromkeys(FILES, 0o644)
        (folder / "adapter_config.json").chmod(0o640)  # a mode the user chose is kept on overwrite
        atomic_write(folder / "adapter_config.json", lambda tmp: Path(tmp).write_text("{}"))
        assert (folder / "adapter_config.json").stat().st_mode & 0o777 == 0o640
    finally:
        os.umask(previous)


@pytest.mark.skipif(os.name != "posix", reason="POSIX file modes")
def test_merged_folder_gets_the_usual_permissions(tmp_path):
    from hf_lora.merge import merge_adapter

    previous = os.umask(0o022)
    try:
        make_llama().save_pretrained(str(tmp_path / "base"))
        _, adapter = _saved(tmp_path)
        merge_adapter(str(tmp_path / "base"), str(adapter), str(tmp_path / "merged"))
        merged = tmp_path / "merged"
        assert merged.stat().st_mode & 0o777 == 0o755
        assert {p.stat().st_mode & 0o777 for p in merged.iterdir()} == {0o644}
    finally:
        os.umask(previous)
