"""Adapter switching benchmark: ``set_adapter`` vs copying the adapter's bytes vs reloading.

    python benchmarks/bench_switch.py                       # CPU, LLaMA-like 8 x 1024, r=16 all-linear
    python benchmarks/bench_switch.py --device cuda --hidden 4096 --intermediate 11008 --layers 32 --heads 32

A switch writes the active adapter's live values back to its buffers (one copy of the adapter's
bytes) and copies the next adapter in (a second copy), plus per-layer bookkeeping. The reference
``copy`` is one ``copy_`` of every tensor of one adapter into preallocated tensors on the same
device, so ``switch / (2 x copy)`` near 1 means switching is as cheap as moving the bytes.
``reload`` is what switching replaces: ``LoRAModelWrapper.from_pretrained`` on a fresh base
(wrap + read the file + load). Times are medians over ``--repeats`` interleaved rounds.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable

import torch
from bench_train import positive_int


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _median_seconds(fn: Callable[[], None], repeats: int, device: str) -> float:
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _base(args: argparse.Namespace):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=args.hidden, intermediate_size=args.intermediate, num_hidden_layers=args.layers,
                         num_attention_heads=args.heads, num_key_value_heads=args.heads, vocab_size=args.vocab)
    return LlamaForCausalLM(config).eval()


def main(argv: list[str] | None = None) -> dict[str, float]:
    """Run the benchmark and print a table; returns the figures."""
    from hf_lora import LoRAConfig, LoRAModelWrapper, wrap

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--intermediate", type=int, default=2816)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--vocab", type=int, default=1024)
    parser.add_argument("--r", type=int, default=16)
    parser.add_argument("--repeats", type=positive_int, default=41)
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (1 keeps timings stable on shared machines)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as root:
        for name, seed in (("a", 1), ("b", 2)):
            torch.manual_seed(seed)
            config = LoRAConfig(r=args.r, lora_alpha=2 * args.r, target_modules="all-linear", init_lora_weights=False)
            wrap(_base(args), config).save_pretrained(f"{root}/{name}")
        model = LoRAModelWrapper.from_pretrained(_base(args).to(args.device), f"{root}/a")
        model.load_adapter(f"{root}/b", "b")
        params = list(model.adapter_parameters().values())
        adapter_bytes = sum(p.numel() * p.element_size() for p in params)
        sources = [p.detach().clone() for p in params]
        targets = [torch.empty_like(p) for p in params]

        def copy_once() -> None:
            for target, source in zip(targets, sources):
                target.copy_(source)

        # Interleaved so both see the same machine load (shared CPUs make timings drift).
        switches, copies = [], []
        for round_ in range(args.repeats):
            name = "b" if round_ % 2 == 0 else "default"
            switches.append(_median_seconds(lambda name=name: model.set_adapter(name), 1, args.device))
            copies.append(_median_seconds(copy_once, 1, args.device))
        switch, copy = statistics.median(switches), statistics.median(copies)
        reload = _median_seconds(
            lambda: LoRAModelWrapper.from_pretrained(_base(args).to(args.device), f"{root}/b"), 3, args.device)
        build = _median_seconds(lambda: _base(args).to(args.device), 3, args.device)

    figures = {
        "adapter_MiB": adapter_bytes / 2**20, "tensors": len(params), "switch_ms": 1e3 * switch,
        "copy_ms": 1e3 * copy, "switch_over_two_copies": switch / (2 * copy),
        "reload_ms": 1e3 * max(reload - build, 0.0), "reload_over_switch": max(reload - build, 0.0) / switch,
    }
    print(f"device={args.device} layers={args.layers} hidden={args.hidden} r={args.r} all-linear: "
          f"{figures['tensors']} adapter tensors, {figures['adapter_MiB']:.2f} MiB")
    print(f"{'set_adapter (median)':<34} {figures['switch_ms']:9.3f} ms")
    print(f"{'copy of one adapter (median)':<34} {figures['copy_ms']:9.3f} ms")
    print(f"{'switch / (2 x copy)':<34} {figures['switch_over_two_copies']:9.2f}")
    print(f"{'from_pretrained, base build excluded':<34} {figures['reload_ms']:9.1f} ms "
          f"({figures['reload_over_switch']:.0f}x a switch)")
    return figures


if __name__ == "__main__":
    main()
