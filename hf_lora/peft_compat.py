"""What PEFT adds implicitly to an adapter, so that files cross between the two libraries.

For the task types ``SEQ_CLS`` and ``TOKEN_CLS`` PEFT appends ``classifier`` and ``score`` to
``modules_to_save`` (``qa_outputs`` for ``QUESTION_ANS``), both when it creates an adapter and
when it loads one, and it ignores entries that match no module. Two consequences:

* a file PEFT wrote for a BERT classifier lists ``score``, which BERT lacks: our loader drops
  entries that match nothing, as PEFT does;
* a file we write with ``task_type="SEQ_CLS"`` but without the head in ``modules_to_save``
  would make PEFT look for head weights that are not in it: the task type is then omitted,
  and PEFT loads the adapter as a plain ``PeftModel`` with the same outputs;
* with ``bias="all"`` PEFT also writes a trained head's bias a second time under
  ``<head>.modules_to_save.bias``: the duplicate is dropped on load.
"""

from __future__ import annotations

import dataclasses
import logging

import torch
from torch import nn

from .config import LoRAConfig
from .layers import TrainedCopy
from .targets import name_matches

logger = logging.getLogger(__name__)

#: Head modules PEFT adds to ``modules_to_save`` per task type.
PEFT_TASK_HEADS: dict[str, tuple[str, ...]] = {
    "SEQ_CLS": ("classifier", "score"),
    "TOKEN_CLS": ("classifier", "score"),
    "QUESTION_ANS": ("qa_outputs",),
}


def _leaf_names(model: nn.Module) -> set[str]:
    return {path.rsplit(".", 1)[-1] for path, _ in model.named_modules() if path}


def task_type_for_peft(task_type: str | None, model: nn.Module) -> str | None:
    """``task_type`` unless PEFT would then expect head weights that the adapter does not hold.

    Args:
        task_type: The detected PEFT task type (``"SEQ_CLS"``...), or ``None``.
        model: The wrapped base model (``modules_to_save`` copies already in place).
    """
    heads = PEFT_TASK_HEADS.get(task_type or "", ())
    saved = {path.rsplit(".", 1)[-1] for path, m in model.named_modules() if isinstance(m, TrainedCopy)}
    unsaved = [head for head in heads if head in _leaf_names(model) and head not in saved]
    return None if unsaved else task_type


def drop_absent_modules_to_save(config: LoRAConfig, model: nn.Module, source: str) -> LoRAConfig:
    """``config`` without the ``modules_to_save`` entries that match no module of ``model``.

    Only for configs read from files: PEFT writes its implicit heads (``score`` for a BERT
    classifier) and skips the absent ones when loading, so a loader must too. A config a user
    builds keeps the strict check of `wrap`.
    """
    if not config.modules_to_save:
        return config
    paths = [path for path, _ in model.named_modules() if path]
    kept = tuple(entry for entry in config.modules_to_save if any(name_matches(entry, path) for path in paths))
    if kept == config.modules_to_save:
        return config
    dropped = [entry for entry in config.modules_to_save if entry not in kept]
    logger.info("%s: modules_to_save entries %s match no module of this model; ignored (as PEFT does).", source, dropped)
    return dataclasses.replace(config, modules_to_save=kept or None)


def drop_duplicate_head_keys(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop the second copy PEFT writes of a ``modules_to_save`` bias under ``bias="all"``.

    With ``bias="all"`` PEFT saves every tensor whose name holds ``bias``, which includes the
    trained head's own ``<head>.modules_to_save.bias`` next to the regular ``<head>.bias``. The
    two are the same tensor; one that differed would be kept and reported as unexpected.
    """
    marker = ".modules_to_save."
    out = {}
    for key, tensor in tensors.items():
        if marker in key:
            twin = key.replace(marker, ".", 1)
            if twin in tensors and torch.equal(tensors[twin], tensor):
                continue
        out[key] = tensor
    return out
