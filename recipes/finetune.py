"""Fine-tune a causal LM with LoRA / QLoRA on the stock ``transformers.Trainer``.

Every field below (model, data, LoRA, and all of ``TrainingArguments``) can be set in a YAML
file given with ``--config`` and overridden on the command line (the command line wins).

    # the embedded default: tiny LLaMA-style model, offline, about a minute on a laptop CPU
    python recipes/finetune.py --config recipes/configs/tiny-llama-lora.yaml
    # same, shorter, elsewhere
    python recipes/finetune.py --config recipes/configs/tiny-llama-lora.yaml --output_dir /tmp/run --max_steps 20
    # 2-process DDP on CPU (gloo: the tiny config sets use_cpu); `--cpu --num_processes 2` would
    # start one process (accelerate's multi-CPU mode needs mpirun)
    accelerate launch --multi_gpu --num_processes 2 recipes/finetune.py --config recipes/configs/tiny-llama-lora.yaml
    # Llama 3 8B, QLoRA, one GPU
    accelerate launch --config_file recipes/accelerate/single_gpu.yaml recipes/finetune.py \\
        --config recipes/configs/llama-3-8b-qlora.yaml

The run ends by writing the adapter (PEFT layout: ``adapter_config.json`` +
``adapter_model.safetensors`` + ``README.md``) to ``output_dir`` and a report
(``report.json``: loss before/after, perplexity, exact match, trainable %, adapter size, time).
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # sibling modules, also under accelerate launch

import finetune_data as fd
import finetune_model as fm


@dataclass
class DataArguments:
    """Where the examples come from and how they become token sequences."""

    dataset_name: str = field(metadata={"help": "Hub dataset id, local folder, or local .json/.jsonl/.csv/.parquet/.txt file."})
    dataset_config_name: str | None = field(default=None, metadata={"help": "Hub dataset configuration."})
    train_split: str = field(default="train", metadata={"help": "Split to train on."})
    eval_split: str | None = field(default=None, metadata={"help": "Split to evaluate on (none: see eval_fraction)."})
    eval_fraction: float = field(default=0.0, metadata={"help": "Hold out this fraction of train when there is no eval_split."})
    prompt_column: str = field(default="prompt", metadata={"help": "Instruction data: the prompt column."})
    response_column: str = field(default="response", metadata={"help": "Instruction data: the response column."})
    messages_column: str = field(default="messages", metadata={"help": "Chat data: list of {role, content} dicts."})
    text_column: str = field(default="text", metadata={"help": "Plain text data (causal LM on every token)."})
    system_prompt: str | None = field(default=None, metadata={"help": "System message prepended to every example."})
    max_seq_length: int = field(default=512, metadata={"help": "Truncate (or, with packing, block) to this many tokens."})
    packing: bool = field(default=False, metadata={"help": "Concatenate examples into max_seq_length blocks."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Use only the first N training rows."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Use only the first N eval rows."})
    exact_match_samples: int = field(default=0, metadata={"help": "Generate answers for N eval rows and score exact match."})
    max_new_tokens: int = field(default=16, metadata={"help": "Generation length for exact match."})
    task_metric: str = field(default=str(Path(__file__).resolve().parent / "metrics" / "exact_match.py"),
                             metadata={"help": "evaluate metric for generated answers (local module or Hub id)."})
    preprocessing_num_workers: int | None = field(default=None, metadata={"help": "Processes for datasets.map."})

    def __post_init__(self) -> None:
        if not 0 <= self.eval_fraction < 1:
            raise ValueError(f"eval_fraction={self.eval_fraction!r} is invalid: expected a fraction in [0, 1).")
        if self.max_seq_length < 8:
            raise ValueError(f"max_seq_length={self.max_seq_length!r} is invalid: expected an integer >= 8.")

    @property
    def columns(self) -> dict[str, str]:
        return {"prompt": self.prompt_column, "response": self.response_column,
                "messages": self.messages_column, "text": self.text_column}


def parse_args(argv: list[str] | None = None) -> tuple[Any, ...]:
    """``(model_args, data_args, lora_args, training_args)`` from ``--config`` YAML plus command-line overrides."""
    import yaml
    from transformers import HfArgumentParser, TrainingArguments

    argv = list(sys.argv[1:] if argv is None else argv)
    parser = HfArgumentParser((fm.ModelArguments, DataArguments, fm.LoRAArguments, TrainingArguments))
    if "--config" in argv:
        at = argv.index("--config")
        if at + 1 >= len(argv):
            raise ValueError("--config needs a YAML file path.")
        path = argv[at + 1]
        del argv[at:at + 2]
        with open(path, encoding="utf-8") as handle:
            values = yaml.safe_load(handle) or {}
        if not isinstance(values, dict):
            raise ValueError(f"{path}: expected a mapping of argument names to values, got {type(values).__name__}.")
        known = {action.dest for action in parser._actions}
        unknown = sorted(set(values) - known)
        if unknown:
            import difflib

            hints = {k: difflib.get_close_matches(k, known, n=1) for k in unknown}
            raise ValueError(f"{path}: unknown settings {unknown}; closest known names: {hints}.")
        parser.set_defaults(**values)
        for action in parser._actions:  # a value from the file satisfies a required argument
            if action.dest in values:
                action.required = False
    return tuple(parser.parse_args_into_dataclasses(args=argv, look_for_args_file=False))


def _exact_match(model: Any, tokenizer: Any, dataset: Any, data_args: DataArguments, fmt: str) -> float | None:
    """Greedy answers for the first eval rows, scored with the ``evaluate`` task metric."""
    if data_args.exact_match_samples <= 0 or dataset is None or fmt == "text":
        return None
    import evaluate
    import torch

    prompts, references = fd.generation_prompts(dataset, tokenizer, fmt=fmt, columns=data_args.columns,
                                                system_prompt=data_args.system_prompt, limit=data_args.exact_match_samples)
    side, tokenizer.padding_side = tokenizer.padding_side, "left"  # generation continues from the right end
    try:
        batch = tokenizer(prompts, add_special_tokens=False, padding=True, return_tensors="pt").to(model.device)
        was_training = model.training
        model.eval()
        with torch.no_grad():
            out = model.generate(**batch, max_new_tokens=data_args.max_new_tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
        model.train(was_training)
    finally:
        tokenizer.padding_side = side
    answers = tokenizer.batch_decode(out[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
    metric = evaluate.load(data_args.task_metric)
    return float(next(iter(metric.compute(predictions=answers, references=references).values())))


def _resume_value(value: str | None) -> str | bool | None:
    """``--resume_from_checkpoint true`` means the last checkpoint in output_dir, not a folder called "true"."""
    if value is not None and value.lower() in ("true", "last"):
        return True
    return None if value is None or value.lower() in ("false", "none", "") else value


def _backend() -> str | None:
    import torch.distributed as dist

    return dist.get_backend() if dist.is_available() and dist.is_initialized() else None


def _first_last_train_loss(history: list[dict[str, Any]]) -> tuple[float | None, float | None]:
    losses = [h["loss"] for h in history if "loss" in h]
    return (losses[0], losses[-1]) if losses else (None, None)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the recipe; returns the report it writes to ``output_dir/report.json``."""
    from transformers import DataCollatorForSeq2Seq, Trainer, set_seed

    started = time.perf_counter()
    model_args, data_args, lora_args, args = parse_args(argv)
    if args.ddp_find_unused_parameters is None:
        args.ddp_find_unused_parameters = False  # every adapter gets a gradient; the search only costs time
    set_seed(args.seed)
    train_raw, eval_raw = fd.load_raw(data_args.dataset_name, data_args.dataset_config_name,
                                      train_split=data_args.train_split, eval_split=data_args.eval_split,
                                      eval_fraction=data_args.eval_fraction, seed=args.seed)
    if data_args.max_train_samples is not None:
        train_raw = train_raw.select(range(min(data_args.max_train_samples, len(train_raw))))
    if eval_raw is not None and data_args.max_eval_samples is not None:
        eval_raw = eval_raw.select(range(min(data_args.max_eval_samples, len(eval_raw))))
    fmt = fd.detect_format(train_raw.column_names, data_args.prompt_column, data_args.response_column,
                           data_args.messages_column, data_args.text_column)

    with args.main_process_first(local=True, desc="building the tokenizer and base model"):
        tokenizer, base = fm.load_tokenizer_and_model(model_args, args, train_raw, fmt, data_args.columns)
    model = fm.wrap_for_training(base, tokenizer, model_args, lora_args)
    trainable, total = model.trainable_parameters()
    if args.should_log:
        model.print_trainable_parameters()

    prep = {"fmt": fmt, "columns": data_args.columns, "system_prompt": data_args.system_prompt,
            "max_seq_length": data_args.max_seq_length, "packing": data_args.packing,
            "num_proc": data_args.preprocessing_num_workers}
    with args.main_process_first(desc="tokenizing"):
        train_ds = fd.prepare(train_raw, tokenizer, desc="train", **prep)
        eval_ds = fd.prepare(eval_raw, tokenizer, desc="eval", **prep) if eval_raw is not None else None

    trainer = Trainer(model=model, args=args, train_dataset=train_ds, eval_dataset=eval_ds, processing_class=tokenizer,
                      data_collator=DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=fd.IGNORE_INDEX,
                                                           pad_to_multiple_of=8),
                      callbacks=fm.callbacks(args), optimizers=fm.optimizers(model, args, lora_args))
    # Generation runs on rank 0 alone: fine for DDP replicas, a deadlock for sharded parameters.
    generate = args.should_save and not fm.is_sharded(args)
    before = trainer.evaluate() if eval_ds is not None else {}
    em_before = _exact_match(model, tokenizer, eval_raw, data_args, fmt) if generate else None
    train_started = time.perf_counter()
    result = trainer.train(resume_from_checkpoint=_resume_value(args.resume_from_checkpoint))
    train_seconds = time.perf_counter() - train_started
    after = trainer.evaluate() if eval_ds is not None else {}
    em_after = _exact_match(model, tokenizer, eval_raw, data_args, fmt) if generate else None

    first, last = _first_last_train_loss(trainer.state.log_history)
    metrics = {k: v for k, v in {"eval_loss": after.get("eval_loss"), "exact_match": em_after}.items() if v is not None}
    fm.save_adapter(trainer, args.output_dir, metrics=metrics)
    if args.should_save:
        tokenizer.save_pretrained(args.output_dir)
    adapter_file = Path(args.output_dir) / "adapter_model.safetensors"
    report = {
        "model": model_args.model_name_or_path,
        "dataset": data_args.dataset_name,
        "world_size": args.world_size,
        "distributed_backend": _backend(),
        "steps": trainer.state.global_step,
        "epoch": trainer.state.epoch,
        "train_loss_first": first,
        "train_loss_last": last,
        "train_loss_mean": result.training_loss,
        "eval_loss_before": before.get("eval_loss"),
        "eval_loss_after": after.get("eval_loss"),
        "perplexity_before": math.exp(before["eval_loss"]) if "eval_loss" in before else None,
        "perplexity_after": math.exp(after["eval_loss"]) if "eval_loss" in after else None,
        "exact_match_before": em_before,
        "exact_match_after": em_after,
        "trainable_params": trainable,
        "total_params": total,
        "trainable_percent": 100.0 * trainable / max(total, 1),
        "adapter_bytes": adapter_file.stat().st_size if adapter_file.exists() else None,
        "train_seconds": round(train_seconds, 2),
        "total_seconds": round(time.perf_counter() - started, 2),
        "output_dir": os.path.abspath(args.output_dir),
    }
    if args.should_save:
        Path(args.output_dir, "report.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        print(format_report(report))
    trainer.accelerator.wait_for_everyone()
    return report


def format_report(report: dict[str, Any]) -> str:
    """The short human-readable summary printed at the end of a run."""

    def num(value: Any, spec: str) -> str:
        return "n/a" if value is None else format(value, spec)

    return "\n".join([
        f"== hf-lora recipe report ({report['steps']} steps, world size {report['world_size']}) ==",
        f"eval loss      {num(report['eval_loss_before'], '.4f')} -> {num(report['eval_loss_after'], '.4f')}"
        f"   (perplexity {num(report['perplexity_before'], '.2f')} -> {num(report['perplexity_after'], '.2f')})",
        f"train loss     {num(report['train_loss_first'], '.4f')} (first log) -> {num(report['train_loss_last'], '.4f')} (last log)",
        f"exact match    {num(report['exact_match_before'], '.3f')} -> {num(report['exact_match_after'], '.3f')}",
        f"trainable      {report['trainable_params']:,d} of {report['total_params']:,d} params"
        f" ({report['trainable_percent']:.2f}%)",
        f"adapter        {num(report['adapter_bytes'], ',d')} bytes in {report['output_dir']}",
        f"time           {report['train_seconds']:.1f} s training, {report['total_seconds']:.1f} s total",
    ])


if __name__ == "__main__":
    main()
