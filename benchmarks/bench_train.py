"""Training-step benchmark: hf_lora vs PEFT vs the frozen-base floor, interleaved in one process.

    python benchmarks/bench_train.py                          # the issue's CPU setting, dropout 0.05 and 0
    python benchmarks/bench_train.py --dropout 0.05 --steps 20 --with-plain
    python benchmarks/bench_train.py --device cuda --dtype bf16 --hidden 4096 --intermediate 11008 \
        --heads 32 --vocab 32000 --seq 1024 --layers 4

Variants (each on its own copy of one random-init LLaMA):
  hf_lora  wrap(model, LoRAConfig(...)) with the fast adapter path (hf_lora/fused.py)
  plain    the same with the fast path switched off (``--with-plain``)
  peft     peft.get_peft_model(model, LoraConfig(...)) (skipped when peft is missing)
  floor    the same model, frozen, no adapter. Its backward computes exactly the activation
           gradients LoRA cannot avoid: the outputs of the adapted projections are made to
           require grad, so gradients flow from the loss down to the first adapted layer and no
           further, and no weight gradient is computed. (``--floor embeddings`` instead makes the
           embedding output require grad, which also back-propagates through layer 0's q/k/v
           inputs: a slightly higher floor.) The floor has no optimizer; LoRA steps include
           AdamW's step on the adapter.

Each timed round runs every variant once (A B C, B C A, ...); times are medians over rounds, and
ratios are medians of the per-round ratios (paired within a round, so slow drift cancels).
Saved activations: bytes of the unique storages autograd saves in one step (parameters and
buffers excluded), from ``torch.autograd.graph.saved_tensors_hooks``. Peak memory: each variant
runs alone in a fresh child process (an allocator that already holds freed memory hides a
step's peak), which reports its peak RSS (VmHWM) and the rise of RSS over the steps; on CUDA,
``max_memory_allocated`` and its rise instead. On a shared machine, wall time depends on the
neighbours; ``cpu ms`` (process CPU time, best with ``--threads 1``) is the steadier figure.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (a count of rounds, steps or repeats)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be at least 1")
    return value


def add_model_args(parser: argparse.ArgumentParser) -> None:
    """Flags shared by the three benchmark scripts (model size, batch, adapter, device)."""
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--intermediate", type=int, default=1376)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--r", type=int, default=16)
    parser.add_argument("--alpha", type=float, default=32)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32",
                        help="base weights' dtype; bf16/fp16 also run the step under autocast (adapters stay fp32)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--seed", type=int, default=0)


def build_base(args: argparse.Namespace) -> nn.Module:
    """A random-init LLaMA of the requested size, on the requested device and dtype."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=args.hidden, intermediate_size=args.intermediate, num_hidden_layers=args.layers,
        num_attention_heads=args.heads, num_key_value_heads=args.heads, vocab_size=args.vocab,
        max_position_embeddings=max(args.seq, 128), tie_word_embeddings=False,
    )
    torch.manual_seed(args.seed)
    model = LlamaForCausalLM(config)
    return model.to(device=args.device, dtype=DTYPES[args.dtype])


def make_hf_lora(base: nn.Module, args: argparse.Namespace, dropout: float) -> nn.Module:
    from hf_lora import LoRAConfig, wrap

    return wrap(copy.deepcopy(base), LoRAConfig(r=args.r, lora_alpha=args.alpha, lora_dropout=dropout,
                                                target_modules=TARGETS))


def make_peft(base: nn.Module, args: argparse.Namespace, dropout: float) -> nn.Module | None:
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        return None
    config = LoraConfig(r=args.r, lora_alpha=args.alpha, lora_dropout=dropout, target_modules=TARGETS)
    return get_peft_model(copy.deepcopy(base), config)


def make_floor(base: nn.Module, how: str) -> nn.Module:
    model = copy.deepcopy(base).requires_grad_(False)

    def needs_grad(_module: nn.Module, _inputs: Any, output: torch.Tensor) -> torch.Tensor:
        return output if output.requires_grad else output.requires_grad_()

    if how == "embeddings":
        model.get_input_embeddings().register_forward_hook(needs_grad)
    else:
        for name, module in model.named_modules():
            if name.rpartition(".")[2] in TARGETS:
                module.register_forward_hook(needs_grad)
    return model


def autocast(args: argparse.Namespace) -> contextlib.AbstractContextManager:
    device_type = torch.device(args.device).type
    if args.dtype == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type, dtype=DTYPES[args.dtype])


def sync(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def make_step(model: nn.Module, ids: torch.Tensor, args: argparse.Namespace) -> Callable[[], None]:
    """One training step: forward, backward and (when there is anything to train) AdamW."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4) if params else None
    model.train()

    def step() -> None:
        with autocast(args):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        if optimizer is not None:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        sync(args.device)

    return step


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field):
                return int(line.split()[1]) * 1024
    return 0


def child_peak(args: argparse.Namespace, base: nn.Module, name: str, dropout: float) -> None:
    """Run one variant alone (this is a child process) and print its peak memory as JSON."""
    from hf_lora import fused

    ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=torch.Generator().manual_seed(1))
    model = {"hf_lora": make_hf_lora, "plain": make_hf_lora, "peft": make_peft}.get(name)
    model = model(base, args, dropout) if model else make_floor(base, args.floor)
    del base
    step = make_step(model, ids.to(args.device), args)
    cuda = torch.device(args.device).type == "cuda"
    before = torch.cuda.memory_allocated() if cuda else _status_bytes("VmRSS:")
    with fused.use_fused(name != "plain"):
        for _ in range(args.warmup + 1):
            step()
    peak = torch.cuda.max_memory_allocated() if cuda else _status_bytes("VmHWM:")
    print(json.dumps({"peak_mb": peak / 2**20, "rise_mb": (peak - before) / 2**20}))


def peak_memory(name: str, dropout: float) -> dict[str, float]:
    """`child_peak` of one variant, in a fresh interpreter with this run's flags."""
    argv = [a for a in sys.argv[1:] if a != "--with-plain"]
    out = subprocess.run([sys.executable, __file__, *argv, "--child", f"{name}:{dropout}"],
                         capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def saved_bytes(model: nn.Module, step: Callable[[], None]) -> int:
    """Bytes of the unique non-parameter storages autograd saves during one step."""
    excluded = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    seen: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in excluded:
            seen[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step()
    return sum(seen.values())


def run(args: argparse.Namespace, base: nn.Module, dropout: float) -> dict[str, dict[str, float]]:
    """Time every variant interleaved; returns per-variant medians and memory figures."""
    from hf_lora import fused

    ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=torch.Generator().manual_seed(1))
    ids = ids.to(args.device)
    variants: dict[str, tuple[Callable[[], None], contextlib.AbstractContextManager, nn.Module]] = {}
    lora = make_hf_lora(base, args, dropout)
    variants["hf_lora"] = (make_step(lora, ids, args), contextlib.nullcontext, lora)
    if args.with_plain:
        plain = make_hf_lora(base, args, dropout)
        variants["plain"] = (make_step(plain, ids, args), lambda: fused.use_fused(False), plain)
    peft = make_peft(base, args, dropout)
    if peft is not None:
        variants["peft"] = (make_step(peft, ids, args), contextlib.nullcontext, peft)
    floor = make_floor(base, args.floor)
    variants["floor"] = (make_step(floor, ids, args), contextlib.nullcontext, floor)

    results: dict[str, dict[str, Any]] = {name: {"times": [], "cpu": []} for name in variants}
    for name, (step, context, model) in variants.items():
        with context():
            for _ in range(args.warmup):
                step()
            results[name]["saved_mb"] = saved_bytes(model, step) / 2**20
    names = list(variants)
    for round_ in range(args.steps):
        for name in names[round_ % len(names):] + names[: round_ % len(names)]:
            step, context, _ = variants[name]
            with context():
                start, start_cpu = time.perf_counter(), time.process_time()
                step()
                results[name]["cpu"].append(time.process_time() - start_cpu)
                results[name]["times"].append(time.perf_counter() - start)
    rounds = {name: (res["times"], res["cpu"]) for name, res in results.items()}
    for name, res in results.items():
        times, cpu = res.pop("times"), res.pop("cpu")
        res["median_ms"] = statistics.median(times) * 1e3
        res["min_ms"] = min(times) * 1e3
        res["cpu_ms"] = statistics.median(cpu) * 1e3
        # Ratios pair the variants within each round (they ran seconds apart), then take the
        # median over rounds: the machine's slow drift cancels, unlike in a ratio of medians.
        for ref in ("peft", "floor"):
            if ref in rounds:
                for key, (mine, theirs) in (("wall", (times, rounds[ref][0])), ("cpu", (cpu, rounds[ref][1]))):
                    res[f"{key}_x_{ref}"] = statistics.median(a / b for a, b in zip(mine, theirs))
        if args.memory:
            res.update(peak_memory(name, dropout))
    return results


def report(results: dict[str, dict[str, float]], dropout: float) -> str:
    """A fixed-width table: times, ratios to PEFT and to the floor, saved bytes, peak memory."""
    peft, floor = results.get("peft"), results["floor"]

    def ratio(res: dict[str, float], ref: dict[str, float] | None, key: str) -> str:
        if ref is None:
            return "-"
        paired = {"median_ms": "wall", "cpu_ms": "cpu"}.get(key)
        if paired:
            return f"{res[f'{paired}_x_' + ('peft' if ref is peft else 'floor')]:.3f}"
        return f"{res[key] / ref[key]:.3f}"

    header = (f"{'variant':8} {'wall ms':>8} {'x peft':>7} {'x floor':>8} {'cpu ms':>8} "
              f"{'x peft':>7} {'x floor':>8} {'saved MB':>9} {'x peft':>7} {'peak MB':>8} {'rise MB':>8}")
    lines = [f"dropout {dropout}", header]
    for name, res in results.items():
        lines.append(
            f"{name:8} {res['median_ms']:8.0f} {ratio(res, peft, 'median_ms'):>7} "
            f"{ratio(res, floor, 'median_ms'):>8} {res['cpu_ms']:8.0f} {ratio(res, peft, 'cpu_ms'):>7} "
            f"{ratio(res, floor, 'cpu_ms'):>8} {res['saved_mb']:9.1f} {ratio(res, peft, 'saved_mb'):>7} "
            f"{res.get('peak_mb', float('nan')):8.0f} {res.get('rise_mb', float('nan')):8.0f}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(parser)
    parser.add_argument("--dropout", type=float, nargs="+", default=[0.05, 0.0])
    parser.add_argument("--steps", type=positive_int, default=10, help="timed rounds (each runs every variant once)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--floor", choices=["outputs", "embeddings"], default="outputs")
    parser.add_argument("--with-plain", action="store_true", help="also time hf_lora with the fast path off")
    parser.add_argument("--no-memory", dest="memory", action="store_false",
                        help="skip the per-variant peak-memory child processes")
    parser.add_argument("--json", help="write the figures to this file")
    parser.add_argument("--child", help=argparse.SUPPRESS)  # internal: VARIANT:DROPOUT
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    base = build_base(args)
    if args.child:
        name, _, dropout = args.child.partition(":")
        child_peak(args, base, name, float(dropout))
        return
    print(f"torch {torch.__version__}, device {args.device}, dtype {args.dtype}, threads {torch.get_num_threads()}; "
          f"hidden {args.hidden}, inter {args.intermediate}, layers {args.layers}, heads {args.heads}, "
          f"vocab {args.vocab}; batch {args.batch}x{args.seq}; r={args.r}, alpha={args.alpha:g}; "
          f"{args.steps} rounds, floor={args.floor}")
    everything = {}
    for dropout in args.dropout:
        results = run(args, base, dropout)
        everything[str(dropout)] = results
        print(report(results, dropout), flush=True)
    if args.json:
        with open(args.json, "w") as out:
            json.dump({"args": vars(args), "torch": torch.__version__, "results": everything}, out, indent=1)


if __name__ == "__main__":
    main()
