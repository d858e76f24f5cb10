"""Merge cost: time and peak memory of ``merge_and_unload`` (hf_lora and PEFT), each in a fresh process.

    python benchmarks/bench_merge.py
    python benchmarks/bench_merge.py --device cuda --dtype bf16 --hidden 4096 --intermediate 11008 --heads 32

Each library runs in its own child process: build the base, wrap it, give the adapters random
factors, then time ``merge_and_unload``. The two libraries alternate for ``--repeats`` fresh
processes each (one merge is a single, noisy shot); medians are reported. Memory is the rise of the peak (VmHWM on CPU,
``max_memory_allocated`` on CUDA) during the merge, next to the size of one copy of the model:
an in-place merge should need only about one adapted weight's worth of scratch space.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

import torch
from bench_infer import randomize
from bench_train import TARGETS, _status_bytes, add_model_args, build_base, positive_int, sync


def child(args: argparse.Namespace, library: str) -> None:
    """Wrap, merge and unload with ``library``; print the figures as JSON (child process)."""
    base = build_base(args)
    if library == "hf_lora":
        from hf_lora import LoRAConfig, wrap

        model = wrap(base, LoRAConfig(r=args.r, lora_alpha=args.alpha, target_modules=TARGETS))
    else:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(base, LoraConfig(r=args.r, lora_alpha=args.alpha, target_modules=TARGETS))
    randomize(model)
    model_mb = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    cuda = torch.device(args.device).type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        with open("/proc/self/clear_refs", "w") as clear:
            clear.write("5")
        before = _status_bytes("VmRSS:")
    start = time.perf_counter()
    merged = model.merge_and_unload()
    sync(args.device)
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() if cuda else _status_bytes("VmHWM:")
    assert not any("lora" in type(m).__name__.lower() for m in merged.modules())
    print(json.dumps({"seconds": seconds, "model_mb": model_mb, "peak_rise_mb": (peak - before) / 2**20}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(parser)
    parser.add_argument("--repeats", type=positive_int, default=3, help="fresh processes per library (alternating)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child:
        child(args, args.child)
        return
    print(f"torch {torch.__version__}, device {args.device}, dtype {args.dtype}; hidden {args.hidden}, "
          f"layers {args.layers}; r={args.r}")
    runs: dict[str, list[dict[str, float]]] = {"hf_lora": [], "peft": []}
    for _ in range(args.repeats):
        for library, results in runs.items():
            run = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--child", library],
                                 capture_output=True, text=True, check=False)
            if run.returncode != 0:
                print(f"{library:8} failed or unavailable: {run.stderr.strip().splitlines()[-1:]}")
                continue
            results.append(json.loads(run.stdout.strip().splitlines()[-1]))
    for library, results in runs.items():
        if not results:
            continue
        seconds = statistics.median(r["seconds"] for r in results)
        rise = statistics.median(r["peak_rise_mb"] for r in results)
        model_mb = results[0]["model_mb"]
        shots = ", ".join(f"{r['seconds'] * 1e3:.0f}" for r in results)
        print(f"{library:8} merge_and_unload {seconds * 1e3:8.1f} ms (runs: {shots}); peak rise {rise:7.1f} MB "
              f"(model {model_mb:.1f} MB, rise / model {rise / model_mb:.3f})")


if __name__ == "__main__":
    main()
