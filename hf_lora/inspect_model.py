"""``hf-lora inspect``: a dry run of `wrap` that reports what would be adapted, touching no weights.

The model is built from its config on the ``meta`` device, so inspecting an 8B model costs no
memory and downloads only ``config.json``.
"""

from __future__ import annotations

import argparse
from collections import defaultdict
from dataclasses import dataclass

import torch
from torch import nn

from .config import LoRAConfig
from .targets import groups_for, plan_targets


@dataclass(frozen=True)
class InspectReport:
    """What `wrap` would do to a model."""

    groups: dict[str, list[str]]  # group label -> module paths
    adapter_params: int
    base_params: int
    adapter_bytes: int  # fp32 safetensors payload

    @property
    def trainable_percent(self) -> float:
        return 100.0 * self.adapter_params / max(self.base_params + self.adapter_params, 1)


def inspect_model(model: nn.Module, config: LoRAConfig) -> InspectReport:
    """Plan the injection of ``config`` into ``model`` without changing it."""
    plan = plan_targets(model, config)
    regexes = groups_for(model)
    import re

    groups: dict[str, list[str]] = defaultdict(list)
    adapter_params = 0
    for target in plan:
        label = next((g for g, rx in regexes.items() if re.fullmatch(rx, target.path)), "other")
        groups[label].append(target.path)
        for shape in target.adapter_shapes().values():
            adapter_params += int(torch.Size(shape).numel())
    base_params = sum(p.numel() for p in model.parameters())
    return InspectReport(dict(groups), adapter_params, base_params, adapter_params * 4)


def _meta_model(model_id: str, trust_remote_code: bool = False) -> nn.Module:
    import transformers
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(model_id, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot read the model config of {model_id!r}: a folder with config.json or a Hub id ({exc})") from None
    # The class the checkpoint was saved from (a classifier has a head a causal-LM class lacks).
    architecture = next(iter(getattr(config, "architectures", None) or []), None)
    model_class = getattr(transformers, architecture, None) if architecture else None
    with torch.device("meta"):
        if model_class is not None:
            return model_class(config)
        return AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)


def format_report(report: InspectReport, config: LoRAConfig) -> str:
    """Human-readable table of an `InspectReport`."""
    lines = [f"LoRA r={config.r} alpha={config.lora_alpha:g} targets={list(config.target_modules) if not isinstance(config.target_modules, str) else config.target_modules}"]
    for group, paths in report.groups.items():
        leaves = sorted({p.rsplit('.', 1)[-1] for p in paths})
        lines.append(f"  {group:<10} {len(paths):>4} modules ({', '.join(leaves)})")
    lines.append(
        f"trainable params: {report.adapter_params:,d} || all params: {report.base_params + report.adapter_params:,d}"
        f" || trainable%: {report.trainable_percent:.4f}"
    )
    lines.append(f"adapter size on disk: {report.adapter_bytes / 2**20:.2f} MiB (fp32 safetensors)")
    return "\n".join(lines)


def _run(args: argparse.Namespace) -> int:
    kwargs = {"r": args.r, "lora_alpha": args.alpha if args.alpha is not None else 2 * args.r}
    if args.target:
        kwargs["target_modules"] = args.target
    config = LoRAConfig(**kwargs)
    model = _meta_model(args.model, trust_remote_code=args.trust_remote_code)
    print(format_report(inspect_model(model, config), config))
    return 0


def add_inspect_parser(commands: argparse._SubParsersAction) -> None:
    """Register ``hf-lora inspect``."""
    parser = commands.add_parser("inspect", help="dry run: which modules would be adapted, and the adapter size")
    parser.add_argument("model", help="model folder or Hub id (only its config.json is read)")
    parser.add_argument("--target", nargs="+", help="target_modules entries (default: attention mlp)")
    parser.add_argument("--r", type=int, default=8, help="rank (default 8)")
    parser.add_argument("--alpha", type=float, default=None, help="lora_alpha (default 2 * r)")
    parser.add_argument("--trust-remote-code", action="store_true", help="allow the model repo's own code (off by default)")
    parser.set_defaults(run=_run)
