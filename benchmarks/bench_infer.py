"""Inference latency: base vs merged vs unmerged adapters (hf_lora and PEFT), interleaved.

    python benchmarks/bench_infer.py                  # the issue's CPU model, batch 4 x 256
    python benchmarks/bench_infer.py --device cuda --dtype bf16 --hidden 4096 --intermediate 11008 --heads 32

Variants, each a forward pass under ``torch.inference_mode``:
  base              the random-init LLaMA, no adapter
  hf_lora_merged    ``wrap(...).merge_and_unload()``: must be the base's module classes and speed
  hf_lora_unmerged  the wrapped model, adapters computed on the fly
  peft_unmerged     PEFT's model, adapters computed on the fly
The adapters get random (non-zero) factors so merging changes the weights.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
from bench_train import TARGETS, add_model_args, autocast, build_base, positive_int, sync
from torch import nn


def randomize(model: nn.Module) -> None:
    """Give every LoRA factor random values (B starts at zero in both libraries)."""
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.01)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(parser)
    parser.add_argument("--steps", type=positive_int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from hf_lora import LoRAConfig, wrap

    base = build_base(args).eval()
    config = LoRAConfig(r=args.r, lora_alpha=args.alpha, lora_dropout=0.0, target_modules=TARGETS)
    unmerged = wrap(copy.deepcopy(base), config).eval()
    randomize(unmerged)
    merged_wrapper = wrap(copy.deepcopy(base), config).eval()
    merged_wrapper.load_state_dict(unmerged.state_dict())
    merged = merged_wrapper.merge_and_unload()
    same_classes = [type(m) for m in merged.modules()] == [type(m) for m in base.modules()]
    variants = {"base": base, "hf_lora_merged": merged, "hf_lora_unmerged": unmerged}
    try:
        from peft import LoraConfig, get_peft_model

        peft = get_peft_model(copy.deepcopy(base), LoraConfig(r=args.r, lora_alpha=args.alpha, target_modules=TARGETS))
        randomize(peft)
        variants["peft_unmerged"] = peft.eval()
    except ImportError:
        pass
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=torch.Generator().manual_seed(1))
    ids = ids.to(args.device)
    with torch.inference_mode(), autocast(args):
        reference = unmerged(input_ids=ids).logits.float()
        max_diff = (merged(input_ids=ids).logits.float() - reference).abs().max().item()
        times: dict[str, list[float]] = {name: [] for name in variants}
        for _ in range(args.warmup):
            for model in variants.values():
                model(input_ids=ids)
        names = list(variants)
        for round_ in range(args.steps):
            for name in names[round_ % len(names):] + names[: round_ % len(names)]:
                start = time.perf_counter()
                variants[name](input_ids=ids)
                sync(args.device)
                times[name].append(time.perf_counter() - start)
    print(f"torch {torch.__version__}, device {args.device}, dtype {args.dtype}, threads {torch.get_num_threads()}; "
          f"hidden {args.hidden}, layers {args.layers}; batch {args.batch}x{args.seq}; r={args.r}; {args.steps} rounds")
    print(f"merged model has the base's module classes: {same_classes}; "
          f"max |merged - unmerged| logit difference: {max_diff:.2e}")
    medians = {name: statistics.median(t) * 1e3 for name, t in times.items()}
    for name, ms in medians.items():
        print(f"{name:18} {ms:9.1f} ms   x base {ms / medians['base']:.3f}")
    overhead = {name: medians[name] / medians["base"] - 1 for name in medians if name.endswith("_unmerged")}
    print("unmerged overhead over base: " + ", ".join(f"{n} {100 * o:+.1f}%" for n, o in overhead.items()))


if __name__ == "__main__":
    main()
