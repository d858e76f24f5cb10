"""Model side of ``recipes/finetune.py``: load (or build) the base, quantize, wrap with LoRA, save.

Adapter saving is the one place where the distributed backend matters: under DDP every rank
holds the whole adapter and rank 0 writes it; under DeepSpeed ZeRO-3 and FSDP the adapter
tensors are sharded, so they are gathered first and an empty tensor is refused rather than
written.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from hf_lora import LoRAConfig, wrap

_DTYPES = {"auto": "auto", "bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


@dataclass
class ModelArguments:
    """Which base model, in which precision, with which tokenizer."""

    model_name_or_path: str = field(metadata={"help": "Hub id or local folder of the base model."})
    init_from_config: bool = field(default=False, metadata={
        "help": "Build a randomly initialised model from the folder's config.json instead of loading weights "
                "(the offline demo); it is saved to output_dir/base_model so the adapter has a base to load onto."})
    tokenizer_name: str | None = field(default=None, metadata={"help": "Tokenizer (default: model_name_or_path)."})
    train_tokenizer_vocab: int = field(default=0, metadata={
        "help": "> 0: train a byte-level BPE tokenizer of this size on the training data instead of loading one."})
    dtype: str = field(default="auto", metadata={"help": f"Weights dtype: {', '.join(_DTYPES)}."})
    load_in_4bit: bool = field(default=False, metadata={"help": "QLoRA: load the base in 4-bit (bitsandbytes)."})
    load_in_8bit: bool = field(default=False, metadata={"help": "Load the base in 8-bit (bitsandbytes LLM.int8)."})
    bnb_4bit_quant_type: str = field(default="nf4", metadata={"help": "nf4 or fp4."})
    bnb_4bit_use_double_quant: bool = field(default=True, metadata={"help": "Quantize the 4-bit scales too."})
    bnb_4bit_compute_dtype: str = field(default="bfloat16", metadata={"help": "dtype of 4-bit matmuls."})
    attn_implementation: str | None = field(default=None, metadata={"help": "eager, sdpa, flash_attention_2..."})
    new_special_tokens: list[str] | None = field(default=None, metadata={
        "help": "Tokens added to the tokenizer; the embedding is resized (train their rows with train_new_token_rows)."})
    trust_remote_code: bool = field(default=False, metadata={"help": "Run the model repo's own code (off: safer)."})

    def __post_init__(self) -> None:
        if self.dtype not in _DTYPES:
            raise ValueError(f"dtype={self.dtype!r} is invalid: expected one of {', '.join(_DTYPES)}.")
        if self.bnb_4bit_compute_dtype not in _DTYPES or self.bnb_4bit_compute_dtype == "auto":
            raise ValueError(f"bnb_4bit_compute_dtype={self.bnb_4bit_compute_dtype!r} is invalid: expected "
                             "bfloat16, float16 or float32.")
        if self.load_in_4bit and self.load_in_8bit:
            raise ValueError("load_in_4bit and load_in_8bit are both set; choose one.")
        if self.bnb_4bit_quant_type not in ("nf4", "fp4"):
            raise ValueError(f"bnb_4bit_quant_type={self.bnb_4bit_quant_type!r} is invalid: expected 'nf4' or 'fp4'.")
        if self.train_tokenizer_vocab < 0:
            raise ValueError(f"train_tokenizer_vocab={self.train_tokenizer_vocab!r} is invalid: expected >= 0.")


@dataclass
class LoRAArguments:
    """`hf_lora.LoRAConfig` fields, prefixed ``lora_`` where the bare name would be ambiguous."""

    lora_r: int = field(default=8, metadata={"help": "Rank r."})
    lora_alpha: float = field(default=16, metadata={"help": "Scaling numerator (update scaled by alpha / r)."})
    lora_dropout: float = field(default=0.05, metadata={"help": "Dropout on the adapter input."})
    lora_target_modules: list[str] = field(default_factory=lambda: ["attention", "mlp"], metadata={
        "help": "Groups (attention, mlp, embedding, all-linear), module names, or full-path regexes."})
    lora_exclude_modules: list[str] | None = field(default=None, metadata={"help": "Modules never adapted."})
    lora_bias: str = field(default="none", metadata={"help": "none, all or lora_only."})
    use_rslora: bool = field(default=False, metadata={"help": "Scale by alpha / sqrt(r)."})
    init_lora_weights: str = field(default="true", metadata={
        "help": "true, false, gaussian, pissa, pissa_niter_<N> or olora (docs/variants.md)."})
    use_dora: bool = field(default=False, metadata={"help": "DoRA: trained magnitude x direction (docs/variants.md)."})
    loraplus_lr_ratio: float | None = field(default=None, metadata={
        "help": "LoRA+: B trains at this multiple of learning_rate (16 is typical); unset = one rate. "
                "Not with FSDP/DeepSpeed, which build their own optimizer."})
    modules_to_save: list[str] | None = field(default=None, metadata={"help": "Modules trained in full and saved."})
    train_new_token_rows: bool = field(default=False, metadata={
        "help": "Make the embedding rows of new_special_tokens trainable (only those rows are trained and saved)."})

    def to_config(self, new_tokens: list[int] | dict[str, list[int]] | None = None) -> LoRAConfig:
        """The `LoRAConfig`; ``new_tokens`` become ``trainable_token_indices`` when train_new_token_rows is set."""
        init: Any = {"true": True, "false": False}.get(str(self.init_lora_weights).lower(), self.init_lora_weights)
        if self.train_new_token_rows and not new_tokens:
            raise ValueError("train_new_token_rows=True needs new_special_tokens (the tokens whose rows to train).")
        return LoRAConfig(r=self.lora_r, lora_alpha=self.lora_alpha, lora_dropout=self.lora_dropout,
                          target_modules=self.lora_target_modules, exclude_modules=self.lora_exclude_modules,
                          bias=self.lora_bias, use_rslora=self.use_rslora, use_dora=self.use_dora, init_lora_weights=init,
                          modules_to_save=self.modules_to_save,
                          trainable_token_indices=new_tokens if self.train_new_token_rows else None)


def _training_texts(train_raw: Any, fmt: str, columns: dict[str, str]) -> list[str]:
    if fmt == "text":
        return [str(t) for t in train_raw[columns["text"]]]
    if fmt == "chat":
        return [m["content"] for row in train_raw[columns["messages"]] for m in row]
    return [f"{p}\n{r}" for p, r in zip(train_raw[columns["prompt"]], train_raw[columns["response"]])]


def _quantization_config(model_args: ModelArguments) -> Any:
    from transformers import BitsAndBytesConfig

    if model_args.load_in_4bit:
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=model_args.bnb_4bit_quant_type,
                                  bnb_4bit_use_double_quant=model_args.bnb_4bit_use_double_quant,
                                  bnb_4bit_compute_dtype=_DTYPES[model_args.bnb_4bit_compute_dtype])
    if model_args.load_in_8bit:
        return BitsAndBytesConfig(load_in_8bit=True)
    return None


def load_tokenizer_and_model(model_args: ModelArguments, args: Any, train_raw: Any, fmt: str,
                             columns: dict[str, str]) -> tuple[Any, Any]:
    """The tokenizer and the (possibly quantized, possibly freshly built) base model."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    built = Path(args.output_dir) / "base_model"
    name = model_args.model_name_or_path
    if model_args.init_from_config and not args.should_save and (built / "config.json").exists():
        name, model_args = str(built), _replace(model_args, init_from_config=False, train_tokenizer_vocab=0,
                                                tokenizer_name=None)  # other ranks load what rank 0 built
    if model_args.train_tokenizer_vocab > 0:
        import finetune_data as fd

        tokenizer = fd.train_tokenizer(_training_texts(train_raw, fmt, columns), model_args.train_tokenizer_vocab)
    else:
        tokenizer = AutoTokenizer.from_pretrained(model_args.tokenizer_name or name,
                                                  trust_remote_code=model_args.trust_remote_code)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token  # LLaMA-style tokenizers ship without one
    if model_args.new_special_tokens:
        tokenizer.add_special_tokens({"additional_special_tokens": list(model_args.new_special_tokens)},
                                     replace_extra_special_tokens=False)
    quant = _quantization_config(model_args)
    kwargs: dict[str, Any] = {"trust_remote_code": model_args.trust_remote_code}
    if model_args.attn_implementation:
        kwargs["attn_implementation"] = model_args.attn_implementation
    if model_args.init_from_config:
        config = AutoConfig.from_pretrained(name, trust_remote_code=model_args.trust_remote_code)
        config.vocab_size = len(tokenizer)
        config.pad_token_id, config.bos_token_id, config.eos_token_id = (
            tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id)
        model = AutoModelForCausalLM.from_config(config, **kwargs)
        if args.should_save:
            model.save_pretrained(built)
            tokenizer.save_pretrained(built)
        model = AutoModelForCausalLM.from_pretrained(built, quantization_config=quant, **kwargs) if quant else model
        model.config._name_or_path = str(built.resolve())  # recorded in adapter_config.json
    else:
        if quant is not None:
            kwargs["quantization_config"] = quant
            kwargs["device_map"] = {"": _local_device(args)}
        dtype = _DTYPES[model_args.dtype]
        model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype, **kwargs)
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:
        model.resize_token_embeddings(len(tokenizer))
    return tokenizer, model


def _replace(obj: Any, **changes: Any) -> Any:
    import dataclasses

    return dataclasses.replace(obj, **changes)


def _local_device(args: Any) -> Any:
    if torch.cuda.is_available() and not args.use_cpu:
        return args.local_process_index
    return "cpu"


def optimizers(model: Any, args: Any, lora_args: LoRAArguments) -> tuple[Any, None]:
    """Trainer's ``optimizers``: a LoRA+ optimizer when ``loraplus_lr_ratio`` is set, else Trainer's own."""
    if lora_args.loraplus_lr_ratio is None:
        return None, None
    from hf_lora.optimizers import loraplus_optimizer_from_args

    return loraplus_optimizer_from_args(model, args, lora_args.loraplus_lr_ratio), None


def wrap_for_training(base: Any, tokenizer: Any, model_args: ModelArguments, lora_args: LoRAArguments) -> Any:
    """Inject LoRA (activation checkpointing, if enabled, is switched on later by Trainer through the wrapper)."""
    return wrap(base, lora_args.to_config(_new_token_rows(base, tokenizer, model_args)))


def _new_token_rows(base: Any, tokenizer: Any, model_args: ModelArguments) -> list[int] | dict[str, list[int]]:
    """The new tokens' ids, per module: the input embedding, and an untied output layer too.

    An untied ``lm_head`` gets fresh random rows for new tokens when the embedding is resized;
    unless they are trained (and saved) as well, the model cannot learn to emit the new tokens
    and a reload would draw different random rows.
    """
    ids = tokenizer.convert_tokens_to_ids(list(model_args.new_special_tokens or []))
    inp, out = base.get_input_embeddings(), base.get_output_embeddings()
    if not ids or out is None or out.weight is inp.weight:
        return ids  # a list: the input embedding, and a tied output layer shares its rows
    names = {id(m): p for p, m in base.named_modules()}
    return {names[id(inp)]: ids, names[id(out)]: ids}


def is_sharded(args: Any) -> bool:
    """FSDP or DeepSpeed, set in TrainingArguments or by ``accelerate launch --config_file``."""
    from hf_lora.callbacks import is_sharded_training

    return is_sharded_training(args)


def callbacks(args: Any) -> list[Any]:
    """`hf_lora.LoRACallback`: PEFT adapter files in every checkpoint, gradient and freezing checks.

    Under FSDP / ZeRO-3 the live adapter tensors are shards or empty placeholders, so the
    per-checkpoint PEFT export is switched off (Trainer's own gathered checkpoint still resumes);
    the final adapter is gathered and written by `save_adapter`.
    """
    from hf_lora import LoRACallback

    return [LoRACallback(save_adapter=not is_sharded(args))]


def _gathered_adapter(trainer: Any) -> dict[str, torch.Tensor]:
    """Full adapter tensors on CPU, keyed like `LoRAModelWrapper.adapter_parameters`."""
    model = trainer.model
    params = model.adapter_parameters()
    accelerator = trainer.accelerator
    if trainer.is_deepspeed_enabled:
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(params.values()), modifier_rank=None):
            tensors = {k: p.detach().to("cpu", copy=True) for k, p in params.items()}
    elif trainer.is_fsdp_enabled:
        full = accelerator.get_state_dict(trainer.model_wrapped)  # gathered on rank 0
        tensors = {k: full[f"base_model.{k}"].to("cpu") for k in params} if accelerator.is_main_process else {}
    else:
        tensors = {k: p.detach().to("cpu") for k, p in params.items()}
    for key, tensor in tensors.items():
        if tensor.numel() == 0:
            raise RuntimeError(f"Adapter tensor {key!r} is empty after gathering; refusing to write a broken adapter.")
    return tensors


def save_adapter(trainer: Any, output_dir: str, metrics: dict[str, float] | None = None) -> None:
    """Write the PEFT-layout adapter from the main process (gathering sharded tensors first)."""
    model = trainer.model
    if not (trainer.is_deepspeed_enabled or trainer.is_fsdp_enabled):
        model.save_pretrained(output_dir, is_main_process=trainer.args.should_save, metrics=metrics)
        return
    tensors = _gathered_adapter(trainer)  # every rank takes part in the gather
    if trainer.args.should_save:
        _write_adapter_folder(model, tensors, Path(output_dir), metrics)


def _write_adapter_folder(model: Any, tensors: dict[str, torch.Tensor], folder: Path,
                          metrics: dict[str, float] | None) -> None:
    """The files `LoRAModelWrapper.save_pretrained` writes, from already gathered tensors."""
    import json

    from safetensors.torch import save_file

    from hf_lora.checkpoint import CONFIG_NAME, WEIGHTS_NAME, adapter_config_dict, atomic_write
    from hf_lora.hub import model_card
    from hf_lora.state import peft_key

    by_key = {peft_key(path): t.contiguous() for path, t in tensors.items()}
    config = json.dumps(adapter_config_dict(model), indent=2, sort_keys=True) + "\n"
    atomic_write(folder / WEIGHTS_NAME, lambda tmp: save_file(by_key, tmp, metadata={"format": "pt"}))
    atomic_write(folder / CONFIG_NAME, lambda tmp: Path(tmp).write_text(config))
    card = model_card(model, metrics=metrics)
    atomic_write(folder / "README.md", lambda tmp: Path(tmp).write_text(card, encoding="utf-8"))
