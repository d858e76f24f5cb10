"""Shared pieces of the Trainer tests (tests/test_trainer*.py): tiny datasets, args, snapshots."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from conftest import VOCAB, make_llama
from safetensors import safe_open
from transformers import TrainerCallback

SEQ_LEN = 16


class StopAfter(TrainerCallback):
    """Simulates a killed run: stop right after optimizer step ``step`` (its checkpoint is saved)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= self.step:
            control.should_save = True
            control.should_training_stop = True


def token_dataset(n: int = 8, length: int = SEQ_LEN, seed: int = 0, *, extra_column: bool = False, masked: bool = False):
    """``n`` random token sequences, labels = inputs (causal LM), as a ``datasets.Dataset``.

    Args:
        extra_column: Add a ``text`` column the model's forward does not accept.
        masked: Mask a different-length prefix of each label row with -100, so examples
            contribute different numbers of tokens (what gradient accumulation must weigh).
    """
    from datasets import Dataset

    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (n, length), generator=generator)
    labels = ids.clone()
    if masked:
        for i in range(n):
            labels[i, : (3 * i) % (length - 2)] = -100
    data: dict[str, Any] = {"input_ids": ids.tolist(), "labels": labels.tolist()}
    if extra_column:
        data["text"] = [f"example {i}" for i in range(n)]
    return Dataset.from_dict(data)


def trainer_args(output_dir: Path | str, **overrides: Any):
    """CPU, quiet, deterministic ``TrainingArguments``; overrides win."""
    from transformers import TrainingArguments

    kwargs: dict[str, Any] = {
        "output_dir": str(output_dir), "max_steps": 4, "per_device_train_batch_size": 4,
        "per_device_eval_batch_size": 4, "learning_rate": 1e-2, "report_to": "none", "use_cpu": True,
        "disable_tqdm": True, "save_strategy": "no", "logging_steps": 1, "seed": 0,
        "dataloader_num_workers": 0, "lr_scheduler_type": "constant",
    }
    kwargs.update(overrides)
    return TrainingArguments(**kwargs)


def lora_llama(init_seed: int = 0, **config: Any):
    """Tiny LLaMA (base seed 0) wrapped with LoRA whose init draws from ``init_seed``."""
    from hf_lora import LoRAConfig, wrap

    base = make_llama()
    torch.manual_seed(init_seed)
    config.setdefault("r", 4)
    config.setdefault("lora_dropout", 0.0)
    config.setdefault("target_modules", ["q_proj", "v_proj", "down_proj"])
    return wrap(base, LoRAConfig(**config))


def adapter_snapshot(model) -> dict[str, torch.Tensor]:
    """Clones of the adapter tensors, keyed by path."""
    return {k: v.detach().clone() for k, v in model.adapter_parameters().items()}


def frozen_snapshot(model) -> dict[str, torch.Tensor]:
    """Clones of every non-adapter parameter and buffer of the base model."""
    adapter = set(model.adapter_parameters())
    out = {k: v.detach().clone() for k, v in model.base_model.named_parameters() if k not in adapter}
    out.update({f"buffer:{k}": v.detach().clone() for k, v in model.base_model.named_buffers()})
    return out


def losses(trainer) -> list[float]:
    """Training losses logged per step."""
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


def safetensors_payload(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of a safetensors file."""
    with safe_open(str(path), framework="pt") as handle:
        return {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118 (not a dict)


def files_in(folder: Path) -> set[str]:
    """Names of the plain files directly in ``folder``."""
    return {name for name in os.listdir(folder) if (Path(folder) / name).is_file()}


def read_json(path: Path) -> Any:
    """Parsed JSON file."""
    return json.loads(Path(path).read_text())
