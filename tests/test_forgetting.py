"""Forgetting monitor: reference loss with / without the adapter, logged at every evaluation."""

from __future__ import annotations

import argparse
import inspect
import json.decoder

import pytest
import torch
from conftest import make_llama
from trainer_helpers import lora_llama, trainer_args

from hf_lora.forgetting import KEYS, ForgettingCallback, forgetting_metrics, lm_collate, reference_loss

LENGTH = 32


def _byte_examples(text: str, count: int) -> list[dict[str, list[int]]]:
    """Real text as byte-level tokens (the tiny test models have a 256-token vocabulary)."""
    data = text.encode("utf-8")
    assert len(data) >= count * LENGTH
    return [{"input_ids": list(data[i * LENGTH:(i + 1) * LENGTH])} for i in range(count)]


def _prose() -> str:
    # English prose every Python has: the standard library's argparse documentation.
    return "\n".join(inspect.getdoc(obj) or "" for obj in (argparse, argparse.ArgumentParser.add_argument,
                                                           argparse.ArgumentParser, inspect))


def _code() -> str:
    return inspect.getsource(json.decoder)


def _direct_loss(model, examples) -> float:
    ids = torch.tensor([e["input_ids"] for e in examples])
    with torch.no_grad():
        return float(model(input_ids=ids, labels=ids).loss)


def test_reference_loss_equals_one_forward_over_the_set():
    model = make_llama()
    examples = _byte_examples(_prose(), 8)
    expected = _direct_loss(model, examples)
    assert reference_loss(model, examples, batch_size=3) == pytest.approx(expected, rel=1e-5)  # batches 3, 3, 2
    assert reference_loss(model, examples, batch_size=4, max_batches=1) == pytest.approx(_direct_loss(model, examples[:4]), rel=1e-5)
    padded = lm_collate([{"input_ids": [1, 2, 3], "attention_mask": [1, 1, 0]}])
    assert padded["labels"].tolist() == [[1, 2, -100]]
    with pytest.raises(ValueError, match="batch_size=0 is invalid: expected a positive integer"):
        reference_loss(model, examples, batch_size=0)
    with pytest.raises(ValueError, match="reference dataset is empty"):
        reference_loss(model, [])


def test_forgetting_metrics_without_a_trainer():
    model = lora_llama(init_lora_weights=False)  # random B: the adapter changes the outputs
    examples = _byte_examples(_prose(), 4)
    values = forgetting_metrics(model, examples)
    assert list(values) == list(KEYS)
    assert values["forgetting/ref_loss_base"] == pytest.approx(_direct_loss(make_llama(), examples), rel=1e-5)
    assert values["forgetting/ref_loss"] == pytest.approx(_direct_loss(model, examples), rel=1e-5)
    assert values["forgetting/ref_loss_delta"] == pytest.approx(values["forgetting/ref_loss"] - values["forgetting/ref_loss_base"])
    assert abs(values["forgetting/ref_loss_delta"]) > 1e-3


class _Recorder:
    """Stands in for TensorBoard / W&B: a callback that only reads on_log."""

    def __init__(self) -> None:
        from transformers import TrainerCallback

        class Recorder(TrainerCallback):
            def __init__(self) -> None:
                self.logs: list[dict[str, float]] = []

            def on_log(self, args, state, control, logs=None, **kwargs):
                self.logs.append(dict(logs or {}))

        self.callback = Recorder()


def test_trainer_logs_forgetting_at_each_evaluation(tmp_path):
    from datasets import Dataset
    from transformers import Trainer

    code = [dict(e, labels=e["input_ids"]) for e in _byte_examples(_code(), 24)]
    train, evaluation = Dataset.from_list(code[:16]), Dataset.from_list(code[16:])
    reference = _byte_examples(_prose(), 8)
    model = lora_llama()
    recorder = _Recorder().callback
    args = trainer_args(tmp_path, eval_strategy="steps", eval_steps=2, max_steps=4, learning_rate=3e-2)
    trainer = Trainer(model=model, args=args, train_dataset=train, eval_dataset=evaluation, callbacks=[recorder])
    callback = ForgettingCallback.attach(trainer, reference, batch_size=4)
    trainer.train()

    logged = [entry for entry in trainer.state.log_history if KEYS[2] in entry]
    assert [entry["step"] for entry in logged] == [2, 4]
    assert all(set(KEYS) <= set(entry) for entry in logged)
    assert sum(KEYS[2] in logs for logs in recorder.logs) == 2  # what report_to integrations receive
    last = logged[-1]
    # Direct computation on the final model (evaluation at step 4 is the end of training).
    assert last["forgetting/ref_loss"] == pytest.approx(_direct_loss(model, reference), rel=1e-5)
    assert last["forgetting/ref_loss_base"] == pytest.approx(_direct_loss(make_llama(), reference), rel=1e-5)
    assert last["forgetting/ref_loss_delta"] == pytest.approx(last["forgetting/ref_loss"] - last["forgetting/ref_loss_base"])
    assert last["forgetting/ref_loss_delta"] != 0.0  # the adapter moved (B starts at zero)
    assert callback.base_loss == pytest.approx(last["forgetting/ref_loss_base"])
    metrics = trainer.evaluate()
    assert metrics[KEYS[2]] == pytest.approx(last[KEYS[2]])  # also in evaluate()'s result


def test_callback_requires_a_wrapped_model():
    from transformers import TrainerControl, TrainerState, TrainingArguments

    callback = ForgettingCallback(_byte_examples(_prose(), 2))
    with pytest.raises(ValueError, match="needs the hf_lora-wrapped model"):
        callback.on_evaluate(TrainingArguments(output_dir="unused", report_to="none"), TrainerState(), TrainerControl(),
                             metrics={}, model=make_llama())
    with pytest.raises(ValueError, match="reference_dataset=None is invalid"):
        ForgettingCallback(None)
