"""Resolve ``target_modules`` into a concrete, ordered plan of layers to adapt.

Planning never touches the model, so ``wrap`` can validate everything (and ``hf-lora inspect``
can report everything) before the first module is replaced.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable
from dataclasses import dataclass

from torch import nn

from .config import TARGET_GROUPS, LoRAConfig
from .dispatch import find_kind, lora_class_for
from .layers import LoRALayer

# Group -> full-path regex, per architecture family. Matching is re.fullmatch on the module path.
_LLAMA_STYLE = {
    # q/k/v/o anywhere; fused or differently named projections only under an attention module
    # (Phi-3 qkv_proj, OPT out_proj, GPT-NeoX / Falcon query_key_value + dense, Phi dense).
    "attention": r"(.*\.)?(q_proj|k_proj|v_proj|o_proj)"
                 r"|(.*\.)?(self_attn|self_attention|attention)\.(qkv_proj|out_proj|query_key_value|dense)",
    # gate/up/down anywhere; Phi-3 gate_up_proj, Phi fc1/fc2, NeoX/Falcon dense_h_to_4h/4h_to_h
    # under an MLP, and OPT's fc1/fc2 that sit directly in the decoder layer.
    "mlp": r"(.*\.)?(gate_proj|up_proj|down_proj)"
           r"|(.*\.)?mlp\.(gate_up_proj|fc1|fc2|dense_h_to_4h|dense_4h_to_h)|(.*\.)?layers\.\d+\.(fc1|fc2)",
    "embedding": r"(.*\.)?(embed_tokens|embed_in|word_embeddings)",
}
_GPT2 = {
    "attention": r"(.*\.)?attn\.(c_attn|c_proj)",
    "mlp": r"(.*\.)?mlp\.(c_fc|c_proj)",
    "embedding": r"(.*\.)?wte",
}
_BERT = {
    "attention": r"(.*\.)?attention\.(self\.(query|key|value)|output\.dense)",
    "mlp": r"(.*\.)?(intermediate\.dense|layer\.\d+\.output\.dense)",
    "embedding": r"(.*\.)?word_embeddings",
}
GROUPS_BY_MODEL_TYPE: dict[str, dict[str, str]] = {
    "gpt2": _GPT2,
    "bert": _BERT,
    "roberta": _BERT,
}
# LLaMA, Mistral, Qwen2/3, Gemma and most decoder-only models use the LLaMA names; the default
# also covers Phi, Phi-3, OPT, GPT-NeoX and Falcon (tests/test_wrap.py checks each).
DEFAULT_GROUPS = _LLAMA_STYLE


@dataclass(frozen=True)
class Target:
    """One layer that will get an adapter."""

    path: str
    module: nn.Module
    lora_class: type[LoRALayer]
    r: int
    scaling: float

    def adapter_shapes(self) -> dict[str, tuple[int, ...]]:
        """Shapes of the adapter tensors, keyed by name relative to the LoRA layer."""
        return self.lora_class.adapter_shapes(self.module, self.r)


def groups_for(model: nn.Module) -> dict[str, str]:
    """The group regexes for ``model``'s architecture."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    return GROUPS_BY_MODEL_TYPE.get(model_type, DEFAULT_GROUPS)


def _entries(spec: str | tuple[str, ...] | None) -> tuple[str, ...]:
    if spec is None:
        return ()
    return (spec,) if isinstance(spec, str) else spec


def name_matches(entry: str, path: str) -> bool:
    """The name rule of ``target_modules`` and ``modules_to_save``: exact path, dotted suffix, or full-path regex."""
    if path == entry or path.endswith("." + entry):
        return True
    try:
        return re.fullmatch(entry, path) is not None
    except re.error:
        return False


def _matches(entry: str, path: str, module: nn.Module, groups: dict[str, str], output_layer: nn.Module | None) -> bool:
    if entry == "all-linear":
        kind = find_kind(module)
        return kind is not None and kind.is_linear and module is not output_layer
    if entry in groups:
        return re.fullmatch(groups[entry], path) is not None
    return name_matches(entry, path)


# Task heads of classification / QA models: freshly initialised, trained in full via
# modules_to_save, and often narrower than r, so "all-linear" leaves them out (as PEFT does).
_TASK_HEAD_NAMES = ("score", "classifier", "qa_outputs")


def _output_layer(model: nn.Module) -> nn.Module | None:
    getter = getattr(model, "get_output_embeddings", None)
    try:
        output = getter() if callable(getter) else None
    except (AttributeError, NotImplementedError):
        output = None
    if output is None:
        output = next((m for m in (getattr(model, n, None) for n in _TASK_HEAD_NAMES) if isinstance(m, nn.Module)), None)
    return output


def _adaptable_names(model: nn.Module) -> list[str]:
    names = {path.rsplit(".", 1)[-1] for path, module in model.named_modules() if path and find_kind(module)}
    return sorted(names)


def _nothing_matched(entries: Iterable[str], model: nn.Module) -> ValueError:
    names = _adaptable_names(model)
    close: list[str] = []
    for entry in entries:
        leaf = entry.rsplit(".", 1)[-1]
        close += [n for n in difflib.get_close_matches(leaf, names, n=5, cutoff=0.5) if n not in close]
    hint = f"closest module names: {', '.join(close)}" if close else f"adaptable module names: {', '.join(names[:20])}"
    model_type = getattr(getattr(model, "config", None), "model_type", "unknown")
    return ValueError(
        f"target_modules={list(entries)!r} matched no module of this {model_type!r} model; {hint}. "
        f"Groups: {', '.join(TARGET_GROUPS)}."
    )


def plan_targets(model: nn.Module, config: LoRAConfig) -> list[Target]:
    """Every layer ``config`` adapts, in ``named_modules`` order (deterministic).

    Raises:
        ValueError: nothing matched (with the closest names), a matched module has an
            unsupported type, or a rank exceeds the layer's dimensions.
    """
    groups = groups_for(model)
    output_layer = _output_layer(model)
    targets_spec = _entries(config.target_modules)
    exclude_spec = _entries(config.exclude_modules)
    plan: list[Target] = []
    for path, module in model.named_modules():
        if not path or isinstance(module, LoRALayer):
            continue
        if not any(_matches(e, path, module, groups, output_layer) for e in targets_spec):
            continue
        if any(_matches(e, path, module, groups, output_layer) for e in exclude_spec):
            continue
        if any(path.startswith(t.path + ".") for t in plan):
            continue  # inside a module that is already being adapted
        lora_class = lora_class_for(module, path, use_dora=config.use_dora)
        r = config.rank_for(path)
        target = Target(path, module, lora_class, r, config.scaling_for(path))
        _check_rank(target)
        plan.append(target)
    if not plan:
        raise _nothing_matched(targets_spec, model)
    return plan


def _check_rank(target: Target) -> None:
    # A rank above the smaller dimension adds parameters without adding expressiveness; on a
    # huge vocabulary it can also allocate gigabytes. Refuse before anything is allocated.
    shapes = target.adapter_shapes().values()
    dims = [d for shape in shapes for d in shape if d != target.r]
    limit = min(dims) if dims else target.r
    if target.r > limit:
        raise ValueError(
            f"r={target.r} for module {target.path!r} exceeds its smallest dimension ({limit}); "
            f"use r <= {limit} (set rank_pattern to lower it for this module)."
        )


def match_modules_to_save(model: nn.Module, names: tuple[str, ...] | None) -> list[str]:
    """Paths of the modules listed in ``modules_to_save`` (suffix match); each entry must match."""
    if not names:
        return []
    paths = [p for p, _ in model.named_modules() if p]
    found: list[str] = []
    for entry in names:
        hits = [p for p in paths if name_matches(entry, p) and not any(p.startswith(f + ".") for f in found)]
        if not hits:
            close = difflib.get_close_matches(entry, sorted({p.rsplit(".", 1)[-1] for p in paths}), n=5, cutoff=0.5)
            raise ValueError(
                f"modules_to_save entry {entry!r} matched no module; closest names: {', '.join(close) or 'none'}."
            )
        found += [h for h in hits if h not in found]
    return found


def peft_target_modules(model: nn.Module, paths: list[str]) -> list[str] | str:
    """A ``target_modules`` value PEFT resolves to exactly ``paths`` on this (not yet wrapped) model.

    The leaf names when they select exactly these layers (the common, readable case), otherwise
    a regex of the exact paths.
    """
    leaves = sorted({p.rsplit(".", 1)[-1] for p in paths})
    selected = {
        p
        for p, m in model.named_modules()
        if p and find_kind(m) and any(p == leaf or p.endswith("." + leaf) for leaf in leaves)
    }
    if selected == set(paths):
        return leaves
    return "|".join(re.escape(p) for p in paths)
