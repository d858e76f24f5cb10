"""Watch forgetting while training: the loss on general-domain reference data, with and without the adapter.

Fine-tuning on a narrow task can damage what the base model knew. LoRA leaves the base weights
alone, but the *adapted* model can still forget: the update changes every forward. This module
measures it during training::

    trainer = Trainer(model=wrap(base, config), args=TrainingArguments(..., eval_strategy="steps"), ...)
    ForgettingCallback.attach(trainer, reference_dataset)   # tokenized general text
    trainer.train()

At every evaluation the callback logs, through ``Trainer.log`` (so they reach the Trainer's log
history, TensorBoard, W&B and any other ``report_to`` integration):

* ``forgetting/ref_loss``: mean loss on the reference data with the adapter;
* ``forgetting/ref_loss_base``: the same without it (``disable_adapter``), computed once;
* ``forgetting/ref_loss_delta``: their difference; positive means the model got worse at
  the reference data.

The three values are also added to the metrics ``Trainer.evaluate`` returns, so
``metric_for_best_model="forgetting/ref_loss_delta"`` (with ``greater_is_better=False``) works.
transformers' TensorBoard and W&B integrations file keys without an ``eval_`` prefix under
``train/``; the values are the ones above.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn
from transformers import Trainer, TrainerCallback, TrainerControl, TrainerState, TrainingArguments

Batch = dict[str, torch.Tensor]
KEYS = ("forgetting/ref_loss", "forgetting/ref_loss_base", "forgetting/ref_loss_delta")


def lm_collate(examples: Sequence[Mapping[str, Any]]) -> Batch:
    """Stack tokenized examples of equal length; ``labels`` default to ``input_ids`` (causal LM),
    with positions whose ``attention_mask`` is 0 set to -100."""
    keys = [k for k in examples[0] if k in ("input_ids", "attention_mask", "labels", "token_type_ids")]
    batch = {k: torch.as_tensor([list(e[k]) for e in examples]) for k in keys}
    if "labels" not in batch:
        labels = batch["input_ids"].clone()
        if "attention_mask" in batch:
            labels[batch["attention_mask"] == 0] = -100
        batch["labels"] = labels
    return batch


def _weight(model: nn.Module, batch: Batch) -> int:
    """How many targets the batch's mean loss averages over (so batches combine exactly)."""
    labels = batch["labels"]
    if labels.dim() < 2:
        return int(labels.shape[0])  # one label per example (sequence classification)
    if model._get_name().endswith("ForCausalLM"):
        labels = labels[..., 1:]  # the model shifts: the first position predicts nothing
    return int((labels != -100).sum())


@torch.no_grad()
def reference_loss(
    model: nn.Module,
    dataset: Iterable[Mapping[str, Any]],
    *,
    batch_size: int = 8,
    collate_fn: Callable[[Sequence[Mapping[str, Any]]], Batch] | None = None,
    max_batches: int | None = None,
) -> float:
    """Mean loss of ``model`` on ``dataset``, weighted by target tokens, in eval mode.

    Args:
        model: Any model whose forward returns ``.loss`` given ``labels`` (a wrapper or a base).
        dataset: Tokenized examples (dicts with ``input_ids``, optionally ``labels`` and
            ``attention_mask``), e.g. a ``datasets.Dataset``.
        batch_size: Examples per forward.
        collate_fn: Turns a list of examples into a batch (default `lm_collate`).
        max_batches: Stop after this many batches (None: the whole dataset).

    Returns:
        ``sum_b loss_b * n_b / sum_b n_b`` with ``n_b`` the batch's target count: exactly the loss
        of one forward over the whole set when the examples have equal length.

    Raises:
        ValueError: Empty dataset, a bad ``batch_size``, or a forward that returns no loss.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r} is invalid: expected a positive integer.")
    collate = collate_fn or lm_collate
    accepted = set(inspect.signature(model.forward).parameters)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total, count, examples = 0.0, 0, list(dataset)
    try:
        for start in range(0, len(examples), batch_size):
            if max_batches is not None and start // batch_size >= max_batches:
                break
            batch = collate(examples[start:start + batch_size])
            batch = {k: v.to(device) for k, v in batch.items() if k in accepted or "kwargs" in accepted}
            loss = getattr(model(**batch), "loss", None)
            if loss is None:
                raise ValueError("The model returned no loss for a reference batch; the batches need 'labels'.")
            weight = _weight(model, batch)
            total += float(loss) * weight
            count += weight
    finally:
        model.train(was_training)
    if count == 0:
        raise ValueError("The reference dataset is empty (or every label is -100): nothing to measure forgetting on.")
    return total / count


def base_reference_loss(model: nn.Module, dataset: Iterable[Mapping[str, Any]], **kwargs: Any) -> float:
    """`reference_loss` of the base model: the wrapper under ``disable_adapter``."""
    with model.disable_adapter():
        return reference_loss(model, dataset, **kwargs)


def forgetting_metrics(model: nn.Module, dataset: Iterable[Mapping[str, Any]], base_loss: float | None = None,
                       **kwargs: Any) -> dict[str, float]:
    """The three ``forgetting/*`` values; ``base_loss`` is measured under ``disable_adapter`` when not given."""
    adapted = reference_loss(model, dataset, **kwargs)
    if base_loss is None:
        base_loss = base_reference_loss(model, dataset, **kwargs)
    return dict(zip(KEYS, (adapted, base_loss, adapted - base_loss)))


class ForgettingCallback(TrainerCallback):
    """Log the reference-data loss with and without the adapter at every evaluation (see module doc).

    Args:
        reference_dataset: Tokenized general-domain examples (not the training task's data).
        trainer: The Trainer whose ``log`` reports the values; `attach` sets it. Without one the
            values only go into the metrics ``evaluate`` returns.
        batch_size: Examples per forward on the reference data.
        collate_fn: Batch builder (default `lm_collate`; pass the training data collator for
            variable-length text).
        max_batches: Cap on reference batches per evaluation, to bound its cost.
    """

    def __init__(self, reference_dataset: Iterable[Mapping[str, Any]], *, trainer: Trainer | None = None,
                 batch_size: int = 8, collate_fn: Callable[[Sequence[Mapping[str, Any]]], Batch] | None = None,
                 max_batches: int | None = None) -> None:
        if reference_dataset is None:
            raise ValueError("reference_dataset=None is invalid: expected tokenized examples (dicts with input_ids).")
        self.reference_dataset = reference_dataset
        self.trainer = trainer
        self.loss_kwargs: dict[str, Any] = {"batch_size": batch_size, "collate_fn": collate_fn, "max_batches": max_batches}
        self.base_loss: float | None = None
        self._logged_step: int | None = None

    @classmethod
    def attach(cls, trainer: Trainer, reference_dataset: Iterable[Mapping[str, Any]], **kwargs: Any) -> ForgettingCallback:
        """Build a callback that logs through ``trainer`` and add it to the trainer's callbacks."""
        callback = cls(reference_dataset, trainer=trainer, **kwargs)
        trainer.add_callback(callback)
        return callback

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        # Measured before the first step: with trained biases, disable_adapter later would not be the base.
        model = kwargs.get("model")
        if self.base_loss is None and model is not None and hasattr(model, "disable_adapter"):
            self.base_loss = base_reference_loss(model, self.reference_dataset, **self.loss_kwargs)

    def on_evaluate(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                    metrics: dict[str, float] | None = None, **kwargs: Any) -> None:
        model = kwargs.get("model")
        if model is None or not hasattr(model, "disable_adapter"):
            raise ValueError("ForgettingCallback needs the hf_lora-wrapped model (wrap(...)) as the Trainer's model.")
        if self._logged_step == state.global_step:  # several eval datasets: measure once per step
            values = dict(zip(KEYS, self._last))
        else:
            values = forgetting_metrics(model, self.reference_dataset, self.base_loss, **self.loss_kwargs)
            self.base_loss = values[KEYS[1]]
            self._logged_step, self._last = state.global_step, tuple(values.values())
            if self.trainer is not None:
                self.trainer.log(dict(values))
        if metrics is not None:
            metrics.update(values)
