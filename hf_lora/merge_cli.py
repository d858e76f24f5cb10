"""``hf-lora merge`` and ``hf-lora push``.

    hf-lora merge BASE ADAPTER OUT [--dtype bf16] [--safe]
    hf-lora push ADAPTER REPO_ID [--private] [--revision main]

``--safe`` loads the base with the adapter (quantized again when the base checkpoint is), then the
merged folder, one after the other (never both at once), and compares their logits on a fixed
probe batch. The merged folder is only put in place when they agree.
"""

from __future__ import annotations

import argparse
import gc
import resource
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

from .merge import merge_adapter

# Largest accepted max |logit difference| / max |logit|, by the merged model's dtype. fp32 merges
# agree to rounding; a 16-bit cast of every weight moves logits by about 1% on small models.
_TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 5e-2, torch.float16: 2e-2}


def peak_rss_mib() -> float:
    """Peak resident memory of this process so far, in MiB (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024


def _probe_ids(vocab_size: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (2, 16), generator=generator)


def _logits(model: Any, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids.to(model.device)).logits.float().cpu()


def probe_difference(base: str, adapter: str, merged: str) -> tuple[float, float, torch.dtype]:
    """``(max |merged - wrapped| logit, max |wrapped| logit, merged dtype)`` on a fixed probe batch."""
    from transformers import AutoModelForCausalLM

    from .model import LoRAModelWrapper

    # A quantized base checkpoint loads quantized again (its config says so), as it was trained.
    reference_model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    wrapped = LoRAModelWrapper.from_pretrained(reference_model, adapter).eval()
    ids = _probe_ids(wrapped.get_input_embeddings().num_embeddings)
    reference = _logits(wrapped, ids)
    del wrapped, reference_model
    gc.collect()
    merged_model = AutoModelForCausalLM.from_pretrained(merged, dtype="auto").eval()
    dtype = merged_model.dtype
    got = _logits(merged_model, ids)
    del merged_model
    gc.collect()
    return float((got - reference).abs().max()), float(reference.abs().max()), dtype


def _run_merge(args: argparse.Namespace) -> int:
    out = Path(args.out)
    target = out
    if args.safe:  # merge next to the target, check, then move into place
        target = Path(tempfile.mkdtemp(prefix=f".{out.name}.unchecked-", dir=out.parent if out.parent.exists() else None)) / "model"
    report = merge_adapter(args.base, args.adapter, str(target) if args.safe else args.out, dtype=args.dtype,
                           trust_remote_code=args.trust_remote_code)
    print(f"merged {report.layers_merged} layers into {report.tensors_written} tensors ({report.shards} shard(s), "
          f"dtype {report.dtype}, {report.dequantized} dequantized) in {report.seconds:.2f} s; "
          f"peak RSS {peak_rss_mib():.0f} MiB")
    if args.safe:
        try:
            diff, scale, dtype = probe_difference(args.base, args.adapter, str(target))
            tolerance = _TOLERANCE.get(dtype, 5e-2) * max(scale, 1.0)
            if args.tolerance is not None:
                tolerance = args.tolerance
            if not diff <= tolerance:
                raise ValueError(f"--safe: merged logits differ from the base+adapter logits by {diff:.3g} "
                                 f"(tolerance {tolerance:.3g}); nothing was written to {str(out)!r}.")
            print(f"--safe: max |logit difference| {diff:.3g} <= {tolerance:.3g} (max |logit| {scale:.3g})")
            if out.exists() and (not out.is_dir() or any(out.iterdir())):
                raise ValueError(f"Output folder {str(out)!r} appeared during the merge and is not empty.")
            if out.exists():
                out.rmdir()
            shutil.move(str(target), str(out))
        finally:
            shutil.rmtree(target.parent, ignore_errors=True)
    print(f"wrote {out}")
    return 0


def add_merge_parser(commands: argparse._SubParsersAction) -> None:
    """Register ``hf-lora merge``."""
    parser = commands.add_parser("merge", help="merge an adapter into its base: a standalone model folder, streamed")
    parser.add_argument("base", help="base model folder or Hub id (safetensors; bitsandbytes 4/8-bit is dequantized)")
    parser.add_argument("adapter", help="adapter folder or Hub id (hf_lora or PEFT)")
    parser.add_argument("out", help="new output folder")
    parser.add_argument("--dtype", default=None, help="bf16, fp16 or fp32 (default: keep the base's dtype)")
    parser.add_argument("--safe", action="store_true",
                        help="compare merged logits with base+adapter on a probe batch before writing OUT")
    parser.add_argument("--tolerance", type=float, default=None, help="--safe: max accepted |logit difference|")
    parser.add_argument("--trust-remote-code", action="store_true", help="allow the base repo's own code")
    parser.set_defaults(run=_run_merge)


def _run_push(args: argparse.Namespace) -> int:
    from .hub import push_adapter_folder

    url = push_adapter_folder(args.adapter, args.repo_id, private=args.private, revision=args.revision,
                              commit_message=args.message)
    print(f"pushed {args.adapter} to {args.repo_id}: {url}")
    return 0


def add_push_parser(commands: argparse._SubParsersAction) -> None:
    """Register ``hf-lora push``."""
    parser = commands.add_parser("push", help="upload an adapter folder to the Hugging Face Hub")
    parser.add_argument("adapter", help="adapter folder (adapter_config.json + adapter_model.safetensors)")
    parser.add_argument("repo_id", help="Hub repository, e.g. user/my-adapter (created if missing)")
    parser.add_argument("--private", action="store_true", help="create the repository as private")
    parser.add_argument("--revision", default=None, help="branch to push to")
    parser.add_argument("--message", default="Upload LoRA adapter (hf-lora)", help="commit message")
    parser.set_defaults(run=_run_push)
