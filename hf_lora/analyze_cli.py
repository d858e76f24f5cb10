"""``hf-lora analyze``: rank report of an adapter, optionally against a second one, with figures.

    hf-lora analyze runs/r8 --compare runs/r64 --plot rank.png

prints one row per layer group (rank, effective rank, energy in the first direction, the rank
that keeps 90% of the update's energy, and with ``--compare`` the mean subspace similarity) and
writes ``rank.png`` (singular value spectra) and ``rank_similarity.png`` (phi heatmaps).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from .analysis import (
    DEFAULT_ENERGY,
    LayerFactors,
    layer_group,
    load_factors,
    similarity_grid,
    spectra,
    subspace_similarity,
    summarize,
)
from .safe_io import atomic_write


def format_table(factors: dict[str, LayerFactors], other: dict[str, LayerFactors] | None = None,
                 energy: float = DEFAULT_ENERGY) -> str:
    """The per-group table ``hf-lora analyze`` prints."""
    phi_by_group: dict[str, list[float]] = {}
    if other is not None:
        for path, phi in subspace_similarity(factors, other).items():
            phi_by_group.setdefault(layer_group(path), []).append(phi)
    header = f"{'layer group':<22} {'layers':>6} {'r':>4} {'eff. rank':>9} {'top-1 energy':>12} " \
             f"{f'rank @{energy:.0%}':>9} {'per layer':>9}"
    if other is not None:
        header += f" {'phi':>6}"
    lines = [header, "-" * len(header)]
    for s in summarize(factors, energy):
        row = f"{s.group:<22} {s.layers:>6} {s.r:>4} {s.effective_rank:>9.2f} {s.top1_energy:>12.1%} " \
              f"{s.recommended_rank:>9} {f'{s.layer_ranks[0]}-{s.layer_ranks[1]}':>9}"
        if other is not None:
            values = phi_by_group.get(s.group)
            row += f" {sum(values) / len(values):>6.3f}" if values else f" {'-':>6}"
        lines.append(row)
    return "\n".join(lines)


def _panels(count: int, width: float, height: float):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = min(count, 4)
    rows = -(-count // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(width * cols, height * rows), squeeze=False, layout="constrained")
    for ax in axes.flat[count:]:
        ax.set_visible(False)
    return plt, fig, axes.flat[:count]


def _save_figure(fig: object, path: Path) -> None:
    # Crash-safe like every hf_lora output; the temporary name hides the format, so pass it.
    fmt = Path(path).suffix.lstrip(".") or "png"
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120, format=fmt))  # type: ignore[attr-defined]


def plot_spectra(factors: dict[str, LayerFactors], path: Path) -> Path:
    """One panel per layer group: each layer's singular values, normalised by its largest."""
    by_group: dict[str, list[torch.Tensor]] = {}
    for layer, values in spectra(factors).items():
        by_group.setdefault(layer_group(layer), []).append(values)
    plt, fig, axes = _panels(len(by_group), 3.4, 2.8)
    for index, (ax, (group, values)) in enumerate(zip(axes, by_group.items())):
        for v in values:
            ax.semilogy(range(1, v.numel() + 1), (v / v.max().clamp_min(1e-300)).clamp_min(1e-8).numpy(), alpha=0.6)
        ax.set_title(group, fontsize=9)
        ax.set_xlabel("direction")
        if index % 4 == 0:
            ax.set_ylabel("singular value / largest")
    fig.suptitle("Singular values of delta W = scaling * B A (one line per layer)")
    _save_figure(fig, path)
    plt.close(fig)
    return path


def plot_similarity(a: dict[str, LayerFactors], b: dict[str, LayerFactors], path: Path) -> Path:
    """One heatmap per layer group: ``phi(A_a, A_b, i, j)`` averaged over the group's layers."""
    grids: dict[str, list[torch.Tensor]] = {}
    for layer in subspace_similarity(a, b):
        grids.setdefault(layer_group(layer), []).append(similarity_grid(a, b, layer))
    plt, fig, axes = _panels(len(grids), 3.4, 3.0)
    for index, (ax, (group, items)) in enumerate(zip(axes, grids.items())):
        mean = torch.stack(items).mean(0).numpy()
        image = ax.imshow(mean, vmin=0, vmax=1, cmap="viridis", aspect="auto",
                          extent=(0.5, mean.shape[1] + 0.5, mean.shape[0] + 0.5, 0.5))
        ax.set_title(group, fontsize=9)
        ax.set_xlabel("j (second adapter)")
        if index % 4 == 0:
            ax.set_ylabel("i (first adapter)")
    fig.colorbar(image, ax=list(axes), shrink=0.8)
    fig.suptitle("Subspace similarity phi(i, j) of the A matrices (mean over each group's layers)")
    _save_figure(fig, path)
    plt.close(fig)
    return path


def _run(args: argparse.Namespace) -> int:
    factors = load_factors(args.adapter)
    other = load_factors(args.compare) if args.compare else None
    print(f"{args.adapter}: {len(factors)} adapted layers")
    print(format_table(factors, other, args.energy))
    if args.plot:
        out = Path(args.plot)
        print(f"wrote {plot_spectra(factors, out)}")
        if other is not None:
            print(f"wrote {plot_similarity(factors, other, out.with_name(out.stem + '_similarity' + out.suffix))}")
    return 0


def add_analyze_parser(commands: argparse._SubParsersAction) -> None:
    """Register ``hf-lora analyze``."""
    parser = commands.add_parser("analyze", help="rank analysis of an adapter: spectra, effective rank, similarity")
    parser.add_argument("adapter", help="adapter folder or Hub id")
    parser.add_argument("--compare", help="second adapter (same base): adds the subspace similarity phi")
    parser.add_argument("--plot", help="write figures: PLOT (spectra) and PLOT_similarity (with --compare)")
    parser.add_argument("--energy", type=float, default=DEFAULT_ENERGY,
                        help="energy fraction the recommended rank keeps (default 0.9)")
    parser.set_defaults(run=_run)
