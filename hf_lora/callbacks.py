"""`LoRACallback`: the Trainer glue. It orchestrates; tensor work lives in the library.

``Trainer(model=wrap(model))`` already trains and writes adapter-only, resumable checkpoints
(the wrapper's ``state_dict`` is the adapter). The callback adds what Trainer cannot know:

* ``on_train_begin``: exactly the adapter parameters are trainable (strays are re-frozen),
  every adapter parameter is in the optimizer, and the trainable count is logged once;
* after the first optimizer step: every adapter tensor got a finite, non-zero gradient, or
  training stops with an error that names the likely cause;
* ``on_save`` / ``on_push_begin``: ``adapter_config.json`` + ``adapter_model.safetensors``
  (PEFT layout) + ``README.md`` next to Trainer's files, so each ``checkpoint-N`` and the
  pushed folder load with ``LoRAModelWrapper.from_pretrained`` and ``peft.PeftModel``. It never
  deletes anything: ``model.safetensors`` is what Trainer resumes from.

See ``docs/trainer.md``.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from .checkpoint import CONFIG_NAME
from .gradcheck import GradientReport, gradient_report
from .model import LoRAModelWrapper

logger = logging.getLogger(__name__)

# Log keys that describe the run, not the model; left out of model cards.
_NOT_METRICS = ("epoch", "step", "learning_rate", "grad_norm", "total_flos")
_NOT_METRIC_SUFFIXES = ("_runtime", "_per_second")
_MAX_NAMES = 5


def is_sharded_training(args: TrainingArguments) -> bool:
    """FSDP or DeepSpeed, set in ``TrainingArguments`` or by ``accelerate launch --config_file``.

    The second way leaves ``args.fsdp`` / ``args.deepspeed`` empty and only sets accelerate's
    environment variables, so both are read.
    """
    from_env = any(os.environ.get(k, "").lower() == "true" for k in ("ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED"))
    return bool(args.fsdp or args.deepspeed or from_env)


def training_metrics(log_history: list[dict[str, Any]]) -> dict[str, float]:
    """Latest value of each loss / eval metric in Trainer's ``state.log_history``."""
    metrics: dict[str, float] = {}
    for entry in log_history:
        for key, value in entry.items():
            if key in _NOT_METRICS or key.endswith(_NOT_METRIC_SUFFIXES):
                continue
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                metrics[key] = float(value)
    return metrics


def _names(items: list[str]) -> str:
    shown = ", ".join(items[:_MAX_NAMES])
    return shown + (f" (+{len(items) - _MAX_NAMES} more)" if len(items) > _MAX_NAMES else "")


def _reentrant_checkpointing(args: TrainingArguments) -> bool:
    # transformers >= 5.x names it activation_checkpointing (gradient_checkpointing is a deprecated
    # mirror); without kwargs, use_reentrant defaults to False.
    enabled = getattr(args, "activation_checkpointing", None)
    kwargs = getattr(args, "activation_checkpointing_kwargs", None)
    if enabled is None:
        enabled, kwargs = args.gradient_checkpointing, args.gradient_checkpointing_kwargs
    return bool(enabled) and bool((kwargs or {}).get("use_reentrant", False))


def _gradient_error(report: GradientReport, args: TrainingArguments) -> RuntimeError:
    lines = ["hf_lora: after the first optimizer step some adapter tensors have no usable gradient, so they would not train."]
    if report.missing:
        reentrant = _reentrant_checkpointing(args)
        lines += [
            f"No gradient (not part of the backward graph): {_names(report.missing)}. Likely causes:",
            "  - reentrant gradient checkpointing over inputs that do not require grad"
            + (" (this run uses use_reentrant=True)" if reentrant else "")
            + ": keep the input-grad hook (model.get_base_model().enable_input_require_grads(), or "
            "hf_lora.prepare_for_kbit_training) or pass activation_checkpointing_kwargs={'use_reentrant': False};",
            "  - the adapters are merged (model.merge()) or disabled (disable_adapter()): call model.unmerge() before training;",
            "  - the forward never reaches the adapted module (check target_modules with `hf-lora inspect`).",
        ]
    if report.nonfinite:
        lines.append(
            f"NaN/inf gradient: {_names(report.nonfinite)}. Likely causes: fp16 overflow (use bf16), a learning rate "
            "that is too high, or NaN in the inputs/labels."
        )
    if report.zero:
        lines.append(
            f"All-zero gradient: {_names(report.zero)}. Likely causes: every label is -100, or the loss does not "
            "depend on these modules."
        )
    lines.append("To train anyway, pass LoRACallback(check_gradients=False).")
    return RuntimeError("\n".join(lines))


class LoRACallback(TrainerCallback):
    """Checks and exports for training an hf_lora model with ``transformers.Trainer``.

    Args:
        save_adapter: Write PEFT-layout adapter files into every ``checkpoint-N`` and into
            ``output_dir`` before a Hub push.
        check_gradients: Stop with an explanation if, after the first optimizer step, an
            adapter tensor has a missing, non-finite or unexplained zero gradient.
        enforce_trainable: At train start, re-freeze trainable parameters that are not adapter
            state (``modules_to_save`` copies and configured biases are adapter state).

    Example:
        >>> trainer = Trainer(model=wrap(base), args=args, train_dataset=ds, callbacks=[LoRACallback()])
    """

    def __init__(self, *, save_adapter: bool = True, check_gradients: bool = True, enforce_trainable: bool = True) -> None:
        self.save_adapter = save_adapter
        self.check_gradients = check_gradients
        self.enforce_trainable = enforce_trainable
        self._pending: list[str] | None = None  # tensors still to be seen with a non-zero gradient
        self._steps_checked = 0

    # --- events -----------------------------------------------------------------------------

    def on_init_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        _wrapper(kwargs.get("model"))
        if args.hub_token:
            logger.warning(
                "TrainingArguments.hub_token is set: Trainer pickles the arguments, token included, into "
                "training_args.bin in every checkpoint and push. Prefer the HF_TOKEN environment variable or "
                "`hf auth login`, or pass token= to trainer.push_to_hub()."
            )

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        model = _wrapper(kwargs.get("model"))
        adapter = model.adapter_parameters()
        _check_adapter_trainable(adapter, kwargs.get("optimizer"))
        if self.enforce_trainable:
            _refreeze_strays(model, adapter)
        if _reentrant_checkpointing(args) and not getattr(model.base_model, "_require_grads_hooks", None):
            logger.warning(
                "hf_lora: reentrant gradient checkpointing is on but the input embeddings' output does not "
                "require grad (no input-grad hook), so adapters inside checkpointed blocks get no gradient. "
                "Call hf_lora.prepare_for_kbit_training(model) or use activation_checkpointing_kwargs={'use_reentrant': False}."
            )
        if state.is_world_process_zero:
            trainable, total = model.trainable_parameters()
            logger.info(
                "hf_lora: trainable params: %s || all params: %s || trainable%%: %.4f",
                f"{trainable:,d}", f"{total:,d}", 100 * trainable / max(total, 1),
            )
        self._pending = list(adapter) if self.check_gradients else None
        self._steps_checked = 0

    def on_pre_optimizer_step(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        if not self._pending:
            return
        if is_sharded_training(args):
            logger.info("hf_lora: gradient check skipped: DeepSpeed/FSDP keep gradients outside param.grad.")
            self._pending = None
            return
        model = _wrapper(kwargs.get("model"))
        report = gradient_report(model.base_model, model.lora_config.bias, only=self._pending)
        self._steps_checked += 1
        if report.nonfinite and args.fp16 and self._steps_checked <= 10 and not (report.missing or report.zero):
            return  # fp16 loss scaling skips overflowing first steps; look again at the next one
        if report.failed:
            raise _gradient_error(report, args)
        self._pending = report.waiting or None

    def _warn_sharded_once(self) -> None:
        if not getattr(self, "_warned_sharded", False):
            logger.warning(
                "hf_lora: FSDP/DeepSpeed training: per-checkpoint PEFT adapter files are not written "
                "(the live tensors are shards); gather and save the adapter after training."
            )
            self._warned_sharded = True

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        if not (self.save_adapter and args.should_save):
            return
        if is_sharded_training(args):
            # Live adapter tensors are shards or empty ZeRO-3 placeholders here; exporting them
            # would write a broken adapter. Trainer's own gathered checkpoint still resumes.
            self._warn_sharded_once()
            return
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if not folder.is_dir():
            # Hyper-parameter search saves under a per-trial run folder Trainer does not expose.
            logger.warning("hf_lora: checkpoint folder %s not found; adapter files not written.", folder)
            return
        _wrapper(kwargs.get("model")).save_pretrained(str(folder), metrics=training_metrics(state.log_history))

    def on_push_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        if not (self.save_adapter and args.should_save):
            return
        if is_sharded_training(args):
            self._warn_sharded_once()
            return
        model = _wrapper(kwargs.get("model"))
        metrics = training_metrics(state.log_history)
        # Read by LoRAModelWrapper.create_or_update_model_card, which Trainer calls after it
        # overwrote README.md with its own card.
        model._hf_lora_card_metrics = metrics
        model.save_pretrained(args.output_dir, metrics=metrics)
        # During training the push runs before on_save: give the checkpoint its adapter files now,
        # so a hub_strategy="checkpoint" upload carries them too.
        folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        if os.path.isdir(folder) and not os.path.isfile(os.path.join(folder, CONFIG_NAME)):
            model.save_pretrained(folder, metrics=metrics)


def _check_adapter_trainable(adapter: dict[str, Any], optimizer: Any) -> None:
    frozen = [name for name, p in adapter.items() if not p.requires_grad]
    if frozen:
        raise ValueError(
            f"hf_lora: adapter parameters are frozen, so the optimizer does not hold them: {_names(frozen)}. "
            "An adapter loaded with LoRAModelWrapper.from_pretrained(..., is_trainable=False) is frozen; "
            "load it with is_trainable=True to train it."
        )
    if optimizer is None:
        return
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    absent = [name for name, p in adapter.items() if id(p) not in held]
    if absent:
        raise ValueError(
            f"hf_lora: the optimizer does not hold these adapter parameters: {_names(absent)}. Build the "
            "optimizer from model.adapter_parameters().values() (or let Trainer build it)."
        )


def _refreeze_strays(model: LoRAModelWrapper, adapter: dict[str, Any]) -> None:
    # Safe after the optimizer exists: a parameter without .grad is skipped by every torch optimizer.
    wanted = {id(p) for p in adapter.values()}
    stray = [(n, p) for n, p in model.base_model.named_parameters() if p.requires_grad and id(p) not in wanted]
    for _, param in stray:
        param.requires_grad_(False)
    if stray:
        logger.warning(
            "hf_lora: re-froze %d parameters that are not adapter state: %s. To train a whole module, "
            "list it in LoRAConfig(modules_to_save=[...]).", len(stray), _names([n for n, _ in stray]),
        )


def _wrapper(model: Any) -> LoRAModelWrapper:
    if not isinstance(model, LoRAModelWrapper):
        raise TypeError(
            f"LoRACallback needs the model returned by hf_lora.wrap (a LoRAModelWrapper); Trainer holds "
            f"{type(model).__name__}. Pass Trainer(model=wrap(base_model, config), callbacks=[LoRACallback()])."
        )
    return model


__all__ = ["LoRACallback", "training_metrics"]
