"""Does LoRA forget less than full fine-tuning? A small, offline, CPU experiment.

    python recipes/forgetting_study.py --output_dir outputs/forgetting          # ~20 min on one CPU core
    python recipes/forgetting_study.py --output_dir /tmp/f --quick              # a smoke run in ~1 min

1. Pretrain a byte-level LLaMA-style model (vocab 256, no tokenizer to train) on one real corpus
   every Linux machine has: the license texts under /usr/share/common-licenses (falling back to
   the Python standard library's documentation). Held-out chunks of it are the *reference* set.
2. Fine-tune it on a different corpus, the Python standard library's source code, with the same
   budget (steps x batch) in every run: full fine-tuning at several learning rates, and LoRA
   over a sweep of rank x targets (attention / MLP / both) x learning rate.
3. For each run measure the in-domain *gain* (held-out code loss before - after) and the
   *forgetting* (reference loss after - before, via `hf_lora.forgetting.reference_loss`), write
   ``results.json``, a markdown table ``results.md`` and ``frontier.png`` (gain vs forgetting).

The question it answers: does some LoRA setting reach >= 95% of full fine-tuning's gain with no
more forgetting than full fine-tuning?
"""

from __future__ import annotations

import argparse
import copy
import inspect
import itertools
import json
import math
import pydoc
import time
from pathlib import Path

import torch

from hf_lora import LoRAConfig, wrap
from hf_lora.forgetting import reference_loss

LICENSES = Path("/usr/share/common-licenses")


def reference_text() -> str:
    """General-domain prose: the license texts (or the standard library's documentation)."""
    files = sorted(p for p in LICENSES.glob("*") if p.is_file()) if LICENSES.is_dir() else []
    if files:
        return "\n\n".join(p.read_text(encoding="utf-8", errors="replace") for p in files)
    import argparse as a
    import json as j
    import pathlib as pl
    import textwrap as t
    return "\n\n".join(pydoc.render_doc(m, renderer=pydoc.plaintext) for m in (a, j, pl, t))


def code_text() -> str:
    """In-domain text for fine-tuning: Python standard library source code."""
    import argparse as a
    import email.message as e
    import http.client as h
    import json.decoder as d
    import logging as lg
    return "\n\n".join(inspect.getsource(m) for m in (a, e, h, d, lg))


def chunks(text: str, length: int) -> torch.Tensor:
    data = torch.tensor(list(text.encode("utf-8")), dtype=torch.long)
    n = data.numel() // length
    return data[: n * length].view(n, length)


def split(blocks: torch.Tensor, held_out: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    order = torch.randperm(blocks.shape[0], generator=torch.Generator().manual_seed(seed))
    return blocks[order[held_out:]], blocks[order[:held_out]]


def make_model(args: argparse.Namespace):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(args.seed)
    config = LlamaConfig(hidden_size=args.hidden, intermediate_size=int(args.hidden * 8 / 3) // 8 * 8,
                         num_hidden_layers=args.layers, num_attention_heads=args.hidden // 32,
                         num_key_value_heads=args.hidden // 32, vocab_size=256, max_position_embeddings=args.length,
                         tie_word_embeddings=False)
    return LlamaForCausalLM(config)


def train(model, data: torch.Tensor, steps: int, lr: float, batch: int, seed: int) -> None:
    """AdamW, linear warmup then cosine decay, on random batches of ``data``."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    warmup = max(1, steps // 10)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    generator = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(steps):
        ids = data[torch.randint(0, data.shape[0], (batch,), generator=generator)]
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
    model.eval()


def losses(model, code_eval: torch.Tensor, ref_eval: torch.Tensor) -> tuple[float, float]:
    def as_examples(t: torch.Tensor) -> list[dict[str, list[int]]]:
        return [{"input_ids": row.tolist()} for row in t]

    return (reference_loss(model, as_examples(code_eval), batch_size=32),
            reference_loss(model, as_examples(ref_eval), batch_size=32))


def frontier_plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 5), layout="constrained")
    markers = {"attention": "o", "mlp": "s", "attention+mlp": "^"}
    for row in rows:
        if row["method"] == "full":
            ax.scatter(row["forgetting"], row["gain"], c="black", marker="*", s=160)
            ax.annotate(f"full lr={row['lr']:g}", (row["forgetting"], row["gain"]), fontsize=7, xytext=(4, 4),
                        textcoords="offset points")
        else:
            ax.scatter(row["forgetting"], row["gain"], marker=markers[row["targets"]], alpha=0.75,
                       c=[math.log2(row["r"])], cmap="viridis", vmin=1, vmax=7)
    for label, marker in markers.items():
        ax.scatter([], [], marker=marker, c="gray", label=f"LoRA {label}")
    ax.scatter([], [], marker="*", c="black", s=120, label="full fine-tuning")
    scale = plt.cm.ScalarMappable(cmap="viridis", norm=matplotlib.colors.Normalize(vmin=1, vmax=7))
    fig.colorbar(scale, ax=ax, label="log2 r (LoRA rank)")
    ax.set_xlabel("forgetting: reference loss increase (nats/byte)")
    ax.set_ylabel("gain: in-domain loss decrease (nats/byte)")
    ax.set_title("In-domain gain vs forgetting, same budget (up and left is better)")
    ax.legend(fontsize=8)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--output_dir", default="outputs/forgetting")
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--pretrain_steps", type=int, default=800)
    parser.add_argument("--finetune_steps", type=int, default=150)
    parser.add_argument("--full_lrs", type=float, nargs="+", default=[1e-4, 3e-4, 1e-3])
    parser.add_argument("--lora_lrs", type=float, nargs="+", default=[1e-3, 3e-3, 1e-2])
    parser.add_argument("--ranks", type=int, nargs="+", default=[4, 16, 64])
    parser.add_argument("--targets", nargs="+", default=["attention", "mlp", "attention+mlp"])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="tiny budget, to check that everything runs")
    args = parser.parse_args(argv)
    if args.quick:
        args.pretrain_steps, args.finetune_steps, args.ranks, args.lora_lrs, args.full_lrs = 60, 20, [4], [3e-3], [3e-4]
    torch.set_num_threads(args.threads)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)

    ref_train, ref_eval = split(chunks(reference_text(), args.length), 64, args.seed)
    code_train, code_eval = split(chunks(code_text(), args.length), 64, args.seed + 1)
    print(f"reference corpus: {ref_train.numel() + ref_eval.numel():,d} bytes; code corpus: "
          f"{code_train.numel() + code_eval.numel():,d} bytes; held out: 64 x {args.length} bytes each")
    start = time.time()
    base = make_model(args)
    base_path = out / "pretrained.pt"
    if base_path.is_file():
        base.load_state_dict(torch.load(base_path, weights_only=True))
    else:
        train(base, ref_train, args.pretrain_steps, 3e-3, args.batch, args.seed)
        torch.save(base.state_dict(), base_path)
    code0, ref0 = losses(base, code_eval, ref_eval)
    print(f"pretrained ({time.time() - start:.0f} s): reference loss {ref0:.3f}, code loss {code0:.3f}")

    runs = [("full", None, None, lr) for lr in args.full_lrs]
    runs += [("lora", r, t, lr) for r, t, lr in itertools.product(args.ranks, args.targets, args.lora_lrs)]
    rows = []
    for method, r, targets, lr in runs:
        model = copy.deepcopy(base)
        if method == "lora":
            model = wrap(model, LoRAConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0, target_modules=targets.split("+")))
        train(model, code_train, args.finetune_steps, lr, args.batch, args.seed + 2)
        code1, ref1 = losses(model, code_eval, ref_eval)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        rows.append({"method": method, "r": r, "targets": targets, "lr": lr, "trainable": trainable,
                     "code_loss": code1, "ref_loss": ref1, "gain": code0 - code1, "forgetting": ref1 - ref0})
        print(f"{method:<4} r={r!s:<4} {targets or 'all weights':<14} lr={lr:<7g} gain {code0 - code1:6.3f} "
              f"forgetting {ref1 - ref0:6.3f}  ({time.time() - start:.0f} s)")

    best_full = max((row for row in rows if row["method"] == "full"), key=lambda row: row["gain"])
    # For every full fine-tuning run: LoRA runs with >= 95% of its gain and no more forgetting.
    matching = {f"full lr={full['lr']:g}": [row for row in rows if row["method"] == "lora"
                                            and row["gain"] >= 0.95 * full["gain"] and row["forgetting"] <= full["forgetting"]]
                for full in rows if full["method"] == "full"}
    summary = {"pretrained": {"ref_loss": ref0, "code_loss": code0}, "best_full": best_full,
               "lora_matching_full": matching, "settings": vars(args), "runs": rows,
               "seconds": time.time() - start}
    (out / "results.json").write_text(json.dumps(summary, indent=2))
    lines = ["| method | r | targets | lr | trainable | code loss | gain | ref loss | forgetting |", "|---|---|---|---|---|---|---|---|---|"]
    for row in sorted(rows, key=lambda row: -row["gain"]):
        lines.append(f"| {row['method']} | {row['r'] or '-'} | {row['targets'] or 'all'} | {row['lr']:g} | {row['trainable']:,d} | "
                     f"{row['code_loss']:.3f} | {row['gain']:.3f} | {row['ref_loss']:.3f} | {row['forgetting']:+.3f} |")
    (out / "results.md").write_text("\n".join(lines) + "\n")
    frontier_plot(rows, out / "frontier.png")
    print(f"best full fine-tuning: lr={best_full['lr']:g} gain {best_full['gain']:.3f} forgetting {best_full['forgetting']:.3f}")
    for name, found in matching.items():
        print(f"LoRA runs with >= 95% of the gain of {name} and no more forgetting: {len(found)}")
    return summary


if __name__ == "__main__":
    main()
