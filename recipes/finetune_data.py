"""Data for ``recipes/finetune.py``: load any ``datasets`` source, tokenize, mask prompts, pack.

Three row shapes are understood:

* instruction: a prompt column and a response column (``prompt`` / ``response``);
* chat: a ``messages`` column of ``{"role", "content"}`` dicts (ShareGPT ``{"from", "value"}`` too);
* text: one ``text`` column, trained as plain causal LM (every token is a target).

Instruction and chat rows are rendered with the tokenizer's chat template when it has one
(a plain ``### Instruction / ### Response`` layout otherwise), and only assistant tokens are
targets: every other label is -100, so the loss measures answers, not prompts.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any

IGNORE_INDEX = -100
_PLAIN_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'assistant' %}### Response:\n{{ m['content'] }}{{ eos_token }}\n\n"
    "{% elif m['role'] == 'system' %}{{ m['content'] }}\n\n"
    "{% else %}### Instruction:\n{{ m['content'] }}\n\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}### Response:\n{% endif %}"
)
# The template of the tokenizer trained on the fly: short role tags, and EOS closing every
# answer so the model learns where to stop.
TINY_CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}"
    "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}{{ '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
_FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet", ".txt": "text"}


def load_raw(name: str, config_name: str | None = None, *, train_split: str = "train",
             eval_split: str | None = None, eval_fraction: float = 0.0, seed: int = 42) -> tuple[Any, Any]:
    """``(train, eval or None)`` from a Hub id, a local folder, or a local json/jsonl/csv/parquet/txt file."""
    import datasets

    suffix = os.path.splitext(name)[1].lower()
    if os.path.isfile(name):
        if suffix not in _FILE_BUILDERS:
            raise ValueError(f"dataset_name={name!r}: unsupported file type {suffix!r}; use one of {sorted(_FILE_BUILDERS)}.")
        splits = datasets.load_dataset(_FILE_BUILDERS[suffix], data_files={"train": name})
    elif not os.path.isdir(name) and (suffix in _FILE_BUILDERS or name.startswith((".", "/"))):
        raise ValueError(f"dataset_name={name!r}: no such file or folder.")
    elif os.path.isdir(name) and _split_files(name):
        # A local folder of <split>.<ext> files: every file is a split, whatever its name (train_sft...).
        files = _split_files(name)
        builder = {_FILE_BUILDERS[os.path.splitext(f)[1]] for f in files.values()}
        if len(builder) > 1:
            raise ValueError(f"dataset_name={name!r}: split files of different types {sorted(files.values())}.")
        splits = datasets.load_dataset(builder.pop(), data_files=files)
    else:
        splits = datasets.load_dataset(name, config_name)  # Hub id (or a folder with a loading script/README)
    if train_split not in splits:
        raise ValueError(f"dataset {name!r} has no split {train_split!r}; it has {sorted(splits)}.")
    train = splits[train_split]
    if eval_split is not None:
        if eval_split not in splits:
            raise ValueError(f"dataset {name!r} has no split {eval_split!r}; it has {sorted(splits)}.")
        return train, splits[eval_split]
    if eval_fraction > 0:
        parts = train.train_test_split(test_size=eval_fraction, seed=seed)
        return parts["train"], parts["test"]
    return train, None


def _split_files(folder: str) -> dict[str, str]:
    return {os.path.splitext(f)[0]: os.path.join(folder, f) for f in sorted(os.listdir(folder))
            if os.path.splitext(f)[1] in _FILE_BUILDERS and not f.startswith(".")}


def detect_format(columns: Iterable[str], prompt_column: str, response_column: str,
                  messages_column: str, text_column: str) -> str:
    """``"instruction"``, ``"chat"`` or ``"text"`` from the column names."""
    cols = set(columns)
    if prompt_column in cols and response_column in cols:
        return "instruction"
    if messages_column in cols:
        return "chat"
    if text_column in cols:
        return "text"
    raise ValueError(
        f"Cannot tell the data format from columns {sorted(cols)}: expected ({prompt_column!r}, {response_column!r}), "
        f"{messages_column!r} or {text_column!r} (set prompt_column / response_column / messages_column / text_column)."
    )


def to_messages(row: dict[str, Any], fmt: str, prompt_column: str, response_column: str,
                messages_column: str, system_prompt: str | None) -> list[dict[str, str]]:
    """A row as a chat: optional system message, then user/assistant turns."""
    if fmt == "chat":
        messages = [_role_content(m) for m in row[messages_column]]
    else:
        messages = [{"role": "user", "content": str(row[prompt_column])},
                    {"role": "assistant", "content": str(row[response_column])}]
    if system_prompt and (not messages or messages[0]["role"] != "system"):
        messages = [{"role": "system", "content": system_prompt}] + messages
    return messages


_SHAREGPT_ROLES = {"human": "user", "gpt": "assistant", "system": "system", "tool": "tool", "user": "user",
                   "assistant": "assistant"}


def _role_content(message: dict[str, Any]) -> dict[str, str]:
    """A ``{"role", "content"}`` message; ShareGPT's ``{"from", "value"}`` (human/gpt) is converted."""
    if "role" in message:
        return {"role": str(message["role"]), "content": str(message["content"])}
    if "from" in message and str(message["from"]) in _SHAREGPT_ROLES:
        return {"role": _SHAREGPT_ROLES[str(message["from"])], "content": str(message["value"])}
    raise ValueError(f"Chat message {message!r} has neither role/content nor ShareGPT from/value "
                     f"(from one of {sorted(_SHAREGPT_ROLES)}).")


def chat_template_of(tokenizer: Any) -> str:
    """The tokenizer's chat template, or the plain instruction layout when it has none."""
    return tokenizer.chat_template or _PLAIN_TEMPLATE


def render(tokenizer: Any, messages: list[dict[str, str]], *, add_generation_prompt: bool = False) -> str:
    """Messages rendered as text with the tokenizer's (or the plain) chat template."""
    return tokenizer.apply_chat_template(messages, chat_template=chat_template_of(tokenizer), tokenize=False,
                                         add_generation_prompt=add_generation_prompt)


def assistant_spans(tokenizer: Any, messages: list[dict[str, str]]) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans of each assistant answer.

    A span runs from the end of the text up to the assistant header to the end of the text up
    to and including that answer, so it covers what the template appends to an answer (EOS),
    less trailing whitespace.
    """
    text = render(tokenizer, messages)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        start = len(render(tokenizer, messages[:i], add_generation_prompt=True))
        end = len(render(tokenizer, messages[: i + 1]))
        if render(tokenizer, messages[: i + 1]) != text[:end]:
            raise ValueError("The chat template does not render conversations prefix-consistently; "
                             "cannot locate the assistant tokens to train on.")
        while end > start and text[end - 1].isspace():
            end -= 1  # separators after the answer are the template's, not the answer's
        spans.append((start, end))
    return text, spans


def tokenize_chat(tokenizer: Any, messages: list[dict[str, str]], max_length: int) -> dict[str, list[int]]:
    """Token ids with labels -100 everywhere except on assistant tokens."""
    text, spans = assistant_spans(tokenizer, messages)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, truncation=True, max_length=max_length)
    labels = []
    for token, (start, _) in zip(enc["input_ids"], enc["offset_mapping"]):
        inside = any(lo <= start < hi for lo, hi in spans)
        labels.append(token if inside else IGNORE_INDEX)
    return {"input_ids": enc["input_ids"], "attention_mask": [1] * len(labels), "labels": labels}


def tokenize_text(tokenizer: Any, text: str, max_length: int | None) -> dict[str, list[int]]:
    """Plain causal LM: every token is a target; EOS appended so documents are delimited."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if tokenizer.eos_token_id is not None:
        ids = ids + [tokenizer.eos_token_id]
    if max_length is not None:
        ids = ids[:max_length]
    return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": list(ids)}


def pack(batch: dict[str, list[list[int]]], block_size: int) -> dict[str, list[list[int]]]:
    """Concatenate examples and cut them into ``block_size`` blocks (the last partial block is dropped).

    Attention crosses example boundaries inside a block; that is the usual price of packing
    and is why it is off by default for instruction data.
    """
    out: dict[str, list[list[int]]] = {"input_ids": [], "attention_mask": [], "labels": []}
    ids = [t for seq in batch["input_ids"] for t in seq]
    labels = [t for seq in batch["labels"] for t in seq]
    for start in range(0, len(ids) - block_size + 1, block_size):
        out["input_ids"].append(ids[start:start + block_size])
        out["labels"].append(labels[start:start + block_size])
        out["attention_mask"].append([1] * block_size)
    return out


def prepare(dataset: Any, tokenizer: Any, *, fmt: str, columns: dict[str, str], system_prompt: str | None,
            max_seq_length: int, packing: bool, num_proc: int | None = None, desc: str = "train") -> Any:
    """Tokenize (and optionally pack) a dataset; the result has input_ids, attention_mask, labels."""

    def one(row: dict[str, Any]) -> dict[str, list[int]]:
        if fmt == "text":
            return tokenize_text(tokenizer, str(row[columns["text"]]), None if packing else max_seq_length)
        messages = to_messages(row, fmt, columns["prompt"], columns["response"], columns["messages"], system_prompt)
        return tokenize_chat(tokenizer, messages, max_seq_length)

    tokenized = dataset.map(one, remove_columns=dataset.column_names, num_proc=num_proc, desc=f"Tokenizing {desc}")
    if packing:
        tokenized = tokenized.map(pack, batched=True, fn_kwargs={"block_size": max_seq_length},
                                  num_proc=num_proc, desc=f"Packing {desc} into blocks of {max_seq_length}")
    # Rows with no target token (a prompt longer than max_seq_length) would give a NaN loss.
    return tokenized.filter(lambda row: any(t != IGNORE_INDEX for t in row["labels"]), desc=f"Dropping {desc} rows without targets")


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> Any:
    """A byte-level BPE tokenizer trained on ``texts`` (seconds), with a chat template and special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>"]
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    core.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   additional_special_tokens=specials[3:], chat_template=TINY_CHAT_TEMPLATE)


def generation_prompts(dataset: Any, tokenizer: Any, *, fmt: str, columns: dict[str, str],
                       system_prompt: str | None, limit: int) -> tuple[list[str], list[str]]:
    """Prompts (rendered up to the assistant header) and reference answers, for exact match."""
    prompts, references = [], []
    for row in dataset.select(range(min(limit, len(dataset)))):
        messages = to_messages(row, fmt, columns["prompt"], columns["response"], columns["messages"], system_prompt)
        if messages[-1]["role"] != "assistant":
            continue
        prompts.append(render(tokenizer, messages[:-1], add_generation_prompt=True))
        references.append(messages[-1]["content"])
    return prompts, references
