"""Resume only from complete Trainer checkpoints.

Trainer writes ``checkpoint-N`` in place, file after file: weights (``model.safetensors``),
``training_args.bin``, then optimizer, scheduler and RNG state, and ``trainer_state.json``
last (``Trainer._save_checkpoint``). A run killed in the middle leaves a folder without
``trainer_state.json`` or with a truncated file, and ``resume_from_checkpoint=True`` picks the
highest-numbered folder whatever it holds (``transformers.trainer_utils.get_last_checkpoint``):
it then fails (``FileNotFoundError: .../trainer_state.json``, a safetensors error) or, with a
hand-damaged folder, silently starts over with fresh optimizer state.

This module decides which checkpoints are complete and steers resuming to the newest of them:

    from hf_lora.resume import last_complete_checkpoint
    trainer.train(resume_from_checkpoint=last_complete_checkpoint(args.output_dir))

or, to keep ``resume_from_checkpoint=True``, add ``SkipIncompleteCheckpoints()`` to the
Trainer's callbacks: when the Trainer is built it renames every incomplete ``checkpoint-N``
to ``incomplete-checkpoint-N`` (nothing is deleted), so Trainer's own search skips it. See
``docs/security.md``.
"""

from __future__ import annotations

import json
import logging
import os
import re
import struct
import zipfile
from pathlib import Path
from typing import Any

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

logger = logging.getLogger(__name__)

STATE_NAME = "trainer_state.json"  # written last by Trainer: its presence marks a finished save
WEIGHT_NAMES = ("model.safetensors", "adapter_model.safetensors", "pytorch_model.bin", "adapter_model.bin")
INCOMPLETE_PREFIX = "incomplete-"
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


def _safetensors_problem(path: Path) -> str | None:
    """Why ``path`` is not a whole safetensors file, from its header alone (no tensor is read)."""
    size = path.stat().st_size
    with open(path, "rb") as handle:
        head = handle.read(8)
        if len(head) < 8:
            return f"{path.name} is truncated ({size} bytes)"
        (header_len,) = struct.unpack("<Q", head)
        if header_len > size - 8:
            return f"{path.name} is truncated (header of {header_len} bytes, file of {size})"
        try:
            header = json.loads(handle.read(header_len))
        except ValueError:
            return f"{path.name} has a damaged header"
    if not isinstance(header, dict):
        return f"{path.name} has a damaged header"
    ends = [entry["data_offsets"][1] for key, entry in header.items()
            if key != "__metadata__" and isinstance(entry, dict) and isinstance(entry.get("data_offsets"), list)
            and len(entry["data_offsets"]) == 2]
    expected = 8 + header_len + max(ends, default=0)
    if size < expected:
        return f"{path.name} is truncated ({size} of {expected} bytes)"
    return None


def checkpoint_problem(folder: str | os.PathLike[str]) -> str | None:
    """Why the Trainer checkpoint ``folder`` cannot be resumed from, or ``None`` when it is complete.

    Complete means: ``trainer_state.json`` exists, parses, and records the step in the folder
    name; a weights file exists and its size matches its header; every torch file
    (``optimizer.pt``, ``scheduler.pt``, ``rng_state*.pth``, ``training_args.bin``...) is a
    whole zip archive. Only headers and zip directories are read: nothing is unpickled.

    Args:
        folder: A ``checkpoint-N`` folder written by ``transformers.Trainer``.
    """
    path = Path(folder)
    state_path = path / STATE_NAME
    if not state_path.is_file():
        return f"{STATE_NAME} is missing (Trainer writes it last, so the save was interrupted)"
    try:
        state = json.loads(state_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        return f"{STATE_NAME} is unreadable ({type(exc).__name__})"
    found = _CHECKPOINT.match(path.name)
    step = state.get("global_step") if isinstance(state, dict) else None
    if found is not None and step != int(found.group(1)):
        return f"{STATE_NAME} records global_step={step!r}, not {found.group(1)}"
    weights = [path / name for name in WEIGHT_NAMES if (path / name).is_file()]
    if not weights:
        return f"no weights file ({', '.join(WEIGHT_NAMES)})"
    for weight in weights:
        if weight.suffix == ".safetensors":
            problem = _safetensors_problem(weight)
            if problem:
                return problem
    for torch_file in sorted([*path.glob("*.pt"), *path.glob("*.pth"), *path.glob("*.bin")]):
        if not zipfile.is_zipfile(torch_file):
            return f"{torch_file.name} is truncated or not a torch archive"
    return None


def _checkpoints(output_dir: Path) -> list[tuple[int, Path]]:
    if not output_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in output_dir.iterdir() if (m := _CHECKPOINT.match(p.name)) and p.is_dir()]
    return sorted(found, reverse=True)


def last_complete_checkpoint(output_dir: str | os.PathLike[str]) -> str | None:
    """The newest complete ``checkpoint-N`` in ``output_dir``, or ``None`` when there is none.

    Incomplete folders newer than it are skipped with a warning naming them and the reason.
    Pass the result to ``trainer.train(resume_from_checkpoint=...)``; ``None`` starts afresh.
    Read-only: safe to call from every process of a distributed run.
    """
    for _, folder in _checkpoints(Path(output_dir)):
        problem = checkpoint_problem(folder)
        if problem is None:
            return str(folder)
        logger.warning("Skipping incomplete checkpoint %s: %s.", folder, problem)
    return None


def set_aside_incomplete_checkpoints(output_dir: str | os.PathLike[str]) -> list[Path]:
    """Rename each incomplete ``checkpoint-N`` in ``output_dir`` to ``incomplete-checkpoint-N``.

    Afterwards Trainer's ``resume_from_checkpoint=True`` (and its checkpoint rotation) only see
    complete checkpoints. Nothing is deleted. Returns the new paths. Call it on one process
    only (the main one) before ``trainer.train``.
    """
    moved = []
    for _, folder in _checkpoints(Path(output_dir)):
        problem = checkpoint_problem(folder)
        if problem is None:
            continue
        target = folder.with_name(INCOMPLETE_PREFIX + folder.name)
        suffix = 1
        while target.exists():
            target = folder.with_name(f"{INCOMPLETE_PREFIX}{folder.name}.{suffix}")
            suffix += 1
        os.replace(folder, target)
        logger.warning("Incomplete checkpoint %s (%s) set aside as %s; resuming will skip it.", folder, problem, target)
        moved.append(target)
    return moved


class SkipIncompleteCheckpoints(TrainerCallback):
    """Makes ``trainer.train(resume_from_checkpoint=True)`` skip incomplete checkpoints.

    At the end of ``Trainer.__init__`` (before ``train`` looks for a checkpoint) the main
    process sets incomplete ``checkpoint-N`` folders aside with `set_aside_incomplete_checkpoints`.
    In a multi-process run, prefer passing `last_complete_checkpoint` explicitly: the other
    processes do not wait for the rename.
    """

    def on_init_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        """Set incomplete checkpoints in ``args.output_dir`` aside (main process only)."""
        if args.should_save and args.output_dir:
            set_aside_incomplete_checkpoints(args.output_dir)
