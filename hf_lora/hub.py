"""Model cards and Hub uploads for adapters.

The card's front matter uses ``library_name: peft`` and the ``base_model:adapter:<id>`` tag, which
is how the Hub recognises a repository as a LoRA adapter for a given base model.
"""

from __future__ import annotations

import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .safe_io import atomic_write

if TYPE_CHECKING:
    from .model import LoRAModelWrapper


def model_card(
    wrapper: LoRAModelWrapper,
    *,
    metrics: Mapping[str, float] | None = None,
    dataset: str | None = None,
    extra_tags: Sequence[str] = (),
    appendix: str | None = None,
    repo_id: str | None = None,
) -> str:
    """README.md text for an adapter: YAML front matter, then config, size and metrics.

    Args:
        wrapper: The adapted model.
        metrics: Training/eval metrics to list (e.g. from ``LoRACallback``).
        dataset: A Hub dataset id for the front matter.
        extra_tags: More front-matter tags (e.g. Trainer's), appended without duplicates.
        appendix: Markdown appended at the end (e.g. Trainer's "Training procedure").
        repo_id: The Hub repository the card is pushed to, used in the loading snippet.
    """
    from .checkpoint import _base_name_or_path

    cfg = wrapper.lora_config
    base_id = _base_name_or_path(wrapper.base_model)
    _, total = wrapper.trainable_parameters()
    # From the adapter itself, not requires_grad: an adapter loaded for inference is frozen.
    adapter_params = sum(p.numel() for p in wrapper.adapter_parameters().values())
    tags = ["hf-lora", "lora", "peft"]
    tags += [t for t in dict.fromkeys(extra_tags) if t not in tags]
    front = ["---", "library_name: peft"]
    if base_id:
        front.append(f"base_model: {base_id}")
        tags.append(f"base_model:adapter:{base_id}")
    if dataset:
        front.append(f"datasets:\n- {dataset}")
    front.append("tags:\n" + "\n".join(f"- {t}" for t in tags))
    front.append("---")
    targets = wrapper.peft_target_modules
    body = [
        "",
        f"# LoRA adapter{f' for {base_id}' if base_id else ''}",
        "",
        "Trained with [hf-lora](https://github.com/hf-lora/hf-lora). Load it with hf_lora or PEFT:",
        "",
        "```python",
        "from hf_lora import LoRAModelWrapper",
        f"model = LoRAModelWrapper.from_pretrained(base_model, {repo_id or 'path/to/this/adapter'!r})",
        "```",
        "",
        "| setting | value |",
        "|---|---|",
        f"| r | {cfg.r} |",
        f"| lora_alpha | {cfg.lora_alpha:g} |",
        f"| lora_dropout | {cfg.lora_dropout:g} |",
        f"| target_modules | {', '.join(targets) if isinstance(targets, list) else targets} |",
        f"| use_rslora | {cfg.use_rslora} |",
        f"| adapter parameters | {adapter_params:,d} |",
        f"| trainable % of base | {100 * adapter_params / max(total, 1):.4f} |",
    ]
    if metrics:
        body += ["", "## Training metrics", "", "| metric | value |", "|---|---|"]
        body += [f"| {k} | {v:.6g} |" if isinstance(v, (int, float)) else f"| {k} | {v} |" for k, v in metrics.items()]
    if appendix:
        body += ["", appendix.strip()]
    return "\n".join(front + body) + "\n"


def rewrite_trainer_card(wrapper: LoRAModelWrapper, output_dir: str, *, metrics: Mapping[str, float] | None = None) -> None:
    """Replace the card ``Trainer.create_model_card`` wrote in ``output_dir`` with the adapter card.

    Trainer's card says ``library_name: transformers``, so the Hub would not see an adapter.
    Its tags and its "## Training procedure" section (hyperparameters, results table) are kept.
    """
    from huggingface_hub import ModelCard

    path = Path(output_dir) / "README.md"
    extra_tags: list[str] = []
    appendix = None
    if path.is_file():
        card = ModelCard.load(str(path))
        extra_tags = [t for t in (card.data.tags or []) if not t.startswith("base_model:")]
        text = card.text
        start = text.find("## Training procedure")
        appendix = text[start:] if start >= 0 else None
    text = model_card(wrapper, metrics=metrics, extra_tags=extra_tags, appendix=appendix)
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))  # a crash keeps the old card whole


def push_adapter(
    wrapper: LoRAModelWrapper,
    repo_id: str,
    *,
    token: str | None = None,
    private: bool | None = None,
    revision: str | None = None,
    commit_message: str = "Upload LoRA adapter (hf-lora)",
    metrics: Mapping[str, float] | None = None,
) -> str:
    """Create ``repo_id`` if needed and upload the adapter folder. Returns the commit URL.

    Uploads exactly ``adapter_config.json``, ``adapter_model.safetensors`` and ``README.md``.
    The token is passed to ``huggingface_hub`` only; it is never written to any file.
    """
    from huggingface_hub import HfApi

    if metrics is None:  # metrics LoRACallback recorded at the last Trainer push, if any
        metrics = wrapper.__dict__.get("_hf_lora_card_metrics")
    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    with tempfile.TemporaryDirectory(prefix="hf_lora_push_") as folder:
        wrapper.save_pretrained(folder, metrics=metrics, repo_id=repo_id)
        info: Any = api.upload_folder(
            folder_path=folder, repo_id=repo_id, repo_type="model", revision=revision, commit_message=commit_message
        )
    return str(info)


def push_adapter_folder(
    folder: str,
    repo_id: str,
    *,
    token: str | None = None,
    private: bool | None = None,
    revision: str | None = None,
    commit_message: str = "Upload LoRA adapter (hf-lora)",
) -> str:
    """Upload a saved adapter folder (``hf-lora push``) without loading any model. Returns the commit URL.

    The folder is validated first (its config parses, its weights file exists); only
    ``adapter_config.json``, the weights file and ``README.md`` (when present) are uploaded, so
    optimizer states, reports or tokens lying in a training output folder stay local.
    """
    from huggingface_hub import HfApi

    from .checkpoint import read_config, weights_path

    path = Path(folder)
    if not path.is_dir():
        raise ValueError(f"Adapter folder {folder!r} does not exist.")
    read_config(path)  # raises ValueError naming the file when it is not a loadable adapter config
    weights = weights_path(path)
    if not weights.is_file():
        raise ValueError(f"{folder}: no adapter weights ({weights.name}); nothing to push.")
    files = ["adapter_config.json", weights.name] + (["README.md"] if (path / "README.md").is_file() else [])
    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    info: Any = api.upload_folder(folder_path=str(path), repo_id=repo_id, repo_type="model", revision=revision,
                                  commit_message=commit_message, allow_patterns=files)
    return str(info)
