"""Rank analysis of trained adapters: spectra, effective rank, energy, subspace similarity.

Every function takes an adapter folder, a Hub id or a wrapped model. For each layer the update is
``delta W = scaling * B A`` (``B``: ``out x r``, ``A``: ``r x in``). Its singular values come
from the small ``r x r`` core, never from a dense ``out x in`` SVD: with ``B = Q_B R_B`` and
``A^T = Q_A R_A`` (thin QR), ``delta W = Q_B (scaling * R_B R_A^T) Q_A^T`` and the orthonormal
``Q`` factors leave the singular values of the core unchanged.

The subspace similarity is the LoRA paper's (Hu et al. 2021, section 7.2)::

    phi(A1, A2, i, j) = || V1[:, :i]^T V2[:, :j] ||_F^2 / min(i, j)   in [0, 1]

where ``V`` holds the right-singular vectors of ``A`` (the input directions the adapter reads),
sorted by singular value. Two independent random ``A`` of the same input width ``d`` give
``max(i, j) / d`` on average.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Union

import torch

if TYPE_CHECKING:
    from .model import LoRAModelWrapper

AdapterSource = Union[str, "os.PathLike[str]", "LoRAModelWrapper"]
DEFAULT_ENERGY = 0.9


@dataclass(frozen=True)
class LayerFactors:
    """One layer's adapter: ``delta W = scaling * B @ A`` (up to a transpose for embeddings)."""

    A: torch.Tensor  # r x in, float64
    B: torch.Tensor  # out x r, float64
    scaling: float

    @property
    def r(self) -> int:
        return int(self.A.shape[0])


def layer_group(path: str) -> str:
    """The layer group of a module path: the part after the last block index.

    ``model.layers.3.self_attn.q_proj`` -> ``self_attn.q_proj``; ``transformer.h.0.mlp.c_proj``
    -> ``mlp.c_proj``; a path without an index (``model.embed_tokens``) is its own group.
    """
    parts = path.split(".")
    numeric = [i for i, part in enumerate(parts) if part.isdigit()]
    return ".".join(parts[numeric[-1] + 1:]) if numeric and numeric[-1] + 1 < len(parts) else path


_KEY = re.compile(r"^base_model\.model\.(?P<path>.+)\.(?P<kind>lora_A|lora_B|lora_embedding_A|lora_embedding_B)(\.weight)?$")


def _natural_key(path: str) -> list[tuple[int, int | str]]:
    # safetensors stores keys sorted as text; order layer 10 after layer 2
    return [(0, int(part)) if part.isdigit() else (1, part) for part in path.split(".")]


def _factors_from_folder(source: str | os.PathLike[str]) -> dict[str, LayerFactors]:
    from .checkpoint import read_config, read_tensors, resolve_adapter_folder

    folder = resolve_adapter_folder(str(source), revision=None, token=None, subfolder=None)
    config = read_config(folder)
    found: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in read_tensors(folder).items():
        match = _KEY.match(key)
        if match:
            found.setdefault(match["path"], {})[match["kind"].removeprefix("lora_embedding_").removeprefix("lora_")] = tensor
    out = {}
    for path, pair in sorted(found.items(), key=lambda item: _natural_key(item[0])):
        if set(pair) != {"A", "B"}:
            raise ValueError(f"{folder}: layer {path!r} has only lora_{''.join(pair)}; an adapter needs both A and B.")
        out[path] = LayerFactors(pair["A"].double(), pair["B"].double(), config.scaling_for(path))
    if not out:
        raise ValueError(f"{folder}: no LoRA factors (lora_A / lora_B tensors) found in the adapter weights.")
    return out


def load_factors(source: AdapterSource) -> dict[str, LayerFactors]:
    """Every layer's factors, keyed by module path in the base model.

    A model's layers come in module order; a folder's in natural path order (layer 2 before 10).

    Args:
        source: An adapter folder, a Hub id, or a `LoRAModelWrapper` (its current adapter).

    Raises:
        ValueError: The source holds no LoRA factors or is not an adapter.
    """
    from .model import LoRAModelWrapper
    from .state import lora_layers

    if isinstance(source, LoRAModelWrapper):
        out = {}
        for path, layer in lora_layers(source.base_model):
            a_name, b_name = layer.adapter_attribute_names
            a, b = getattr(layer, a_name), getattr(layer, b_name)
            a, b = getattr(a, "weight", a), getattr(b, "weight", b)
            out[path] = LayerFactors(a.detach().double().cpu(), b.detach().double().cpu(), float(layer.scaling))
        if not out:
            raise ValueError("The wrapped model has no LoRA layers.")
        return out
    if isinstance(source, (str, os.PathLike)):
        return _factors_from_folder(source)
    raise ValueError(f"Expected an adapter folder, a Hub id or a LoRAModelWrapper, got {type(source).__name__}.")


def _as_factors(source: AdapterSource | dict[str, LayerFactors]) -> dict[str, LayerFactors]:
    return source if isinstance(source, dict) else load_factors(source)


def delta_singular_values(factors: LayerFactors) -> torch.Tensor:
    """Singular values of ``scaling * B A``, descending, via the ``r x r`` core (see module doc)."""
    _, r_b = torch.linalg.qr(factors.B)
    _, r_a = torch.linalg.qr(factors.A.T)
    return torch.linalg.svdvals(factors.scaling * (r_b @ r_a.T))


def spectra(source: AdapterSource | dict[str, LayerFactors]) -> dict[str, torch.Tensor]:
    """Layer path -> singular values of its ``delta W`` (length ``r``, descending, float64)."""
    return {path: delta_singular_values(f) for path, f in _as_factors(source).items()}


def numerical_rank(singular_values: torch.Tensor, rtol: float = 1e-6) -> int:
    """How many singular values exceed ``rtol`` times the largest (0 for an all-zero delta)."""
    if singular_values.numel() == 0 or float(singular_values.max()) == 0.0:
        return 0
    return int((singular_values > rtol * singular_values.max()).sum())


def effective_rank(singular_values: torch.Tensor) -> float:
    """Roy & Vetterli's effective rank ``exp(H(p))`` with ``p = s / sum(s)``.

    Equals ``k`` for ``k`` equal non-zero singular values, and drops below the numerical rank as
    the spectrum decays: a rank-8 adapter with effective rank 2 mostly uses two directions.
    """
    total = float(singular_values.sum())
    if total == 0.0:
        return 0.0
    p = singular_values[singular_values > 0] / total
    return math.exp(float(-(p * p.log()).sum()))


def energy_captured(singular_values: torch.Tensor, k: int) -> float:
    """Fraction of ``||delta W||_F^2`` kept by the top ``k`` directions: ``sum s[:k]^2 / sum s^2``."""
    if k < 0:
        raise ValueError(f"k={k} is invalid: expected a non-negative number of directions.")
    squares = singular_values.double() ** 2
    total = float(squares.sum())
    return 1.0 if total == 0.0 else float(squares[:k].sum()) / total


def rank_for_energy(singular_values: torch.Tensor, energy: float = DEFAULT_ENERGY) -> int:
    """The smallest ``k`` whose top-``k`` directions keep at least ``energy`` of the delta."""
    if not 0 < energy <= 1:
        raise ValueError(f"energy={energy!r} is invalid: expected a fraction in (0, 1].")
    squares = singular_values.double() ** 2
    total = float(squares.sum())
    if total == 0.0:
        return 0
    cumulative = torch.cumsum(squares, 0) / total
    return int((cumulative < energy - 1e-12).sum()) + 1


@dataclass(frozen=True)
class GroupSummary:
    """Rank statistics of one layer group (e.g. every ``self_attn.q_proj``)."""

    group: str
    layers: int
    r: int
    effective_rank: float  # mean over the group's layers
    top1_energy: float  # mean fraction of energy in the first direction
    recommended_rank: int  # smallest k keeping `energy` of the group's summed delta energy
    layer_ranks: tuple[int, int]  # min and max of the per-layer smallest k keeping `energy`


def summarize(source: AdapterSource | dict[str, LayerFactors], energy: float = DEFAULT_ENERGY) -> list[GroupSummary]:
    """One `GroupSummary` per layer group, in order of first appearance.

    The recommended rank of a group is the smallest ``k`` such that the top-``k`` directions of
    all its layers together keep ``energy`` of the group's total ``||delta W||_F^2``.
    """
    by_group: dict[str, list[torch.Tensor]] = {}
    for path, values in spectra(source).items():
        by_group.setdefault(layer_group(path), []).append(values)
    out = []
    for group, values in by_group.items():
        width = max(v.numel() for v in values)
        padded = torch.stack([torch.nn.functional.pad(v, (0, width - v.numel())) for v in values])
        per_layer = [rank_for_energy(v, energy) for v in values]
        out.append(GroupSummary(
            group=group,
            layers=len(values),
            r=width,
            effective_rank=sum(effective_rank(v) for v in values) / len(values),
            top1_energy=sum(energy_captured(v, 1) for v in values) / len(values),
            recommended_rank=rank_for_energy((padded**2).sum(0).sqrt(), energy),
            layer_ranks=(min(per_layer), max(per_layer)),
        ))
    return out


def _right_singular_vectors(a: torch.Tensor) -> torch.Tensor:
    """Rows: the right-singular vectors of ``a`` (``r x in``), by descending singular value."""
    return torch.linalg.svd(a, full_matrices=False).Vh


def _check_index(name: str, value: int, limit: int, path: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= limit:
        raise ValueError(f"{name}={value!r} is invalid for layer {path!r}: expected an integer in [1, {limit}].")


def _common_paths(fa: dict[str, LayerFactors], fb: dict[str, LayerFactors]) -> list[str]:
    common = [p for p in fa if p in fb]
    if not common:
        raise ValueError(f"The two adapters share no layer (first: {next(iter(fa))!r} vs {next(iter(fb))!r}).")
    for path in common:
        if fa[path].A.shape[1] != fb[path].A.shape[1]:
            raise ValueError(f"Layer {path!r} has input width {fa[path].A.shape[1]} in one adapter and "
                             f"{fb[path].A.shape[1]} in the other: they are not adapters of the same base.")
    return common


def subspace_similarity(
    a: AdapterSource | dict[str, LayerFactors],
    b: AdapterSource | dict[str, LayerFactors],
    i: int | None = None,
    j: int | None = None,
) -> dict[str, float]:
    """The LoRA paper's ``phi(A_a, A_b, i, j)`` for every layer the two adapters share.

    Args:
        a: First adapter (folder, Hub id, wrapped model).
        b: Second adapter.
        i: Number of top directions of ``a``'s ``A`` (default: the smaller of the two ranks).
        j: Number of top directions of ``b``'s ``A`` (default: the smaller of the two ranks).

    Returns:
        Layer path -> ``phi`` in ``[0, 1]``: 1 when one subspace contains the other, about
        ``max(i, j) / in_features`` for unrelated random adapters.

    Raises:
        ValueError: No shared layer, different input widths, or ``i``/``j`` outside ``[1, r]``.
    """
    fa, fb = _as_factors(a), _as_factors(b)
    out = {}
    for path in _common_paths(fa, fb):
        ra, rb = fa[path].r, fb[path].r
        ii = min(ra, rb) if i is None else i
        jj = min(ra, rb) if j is None else j
        _check_index("i", ii, ra, path)
        _check_index("j", jj, rb, path)
        va, vb = _right_singular_vectors(fa[path].A)[:ii], _right_singular_vectors(fb[path].A)[:jj]
        out[path] = float((va @ vb.T).pow(2).sum()) / min(ii, jj)
    return out


def similarity_grid(a: AdapterSource | dict[str, LayerFactors], b: AdapterSource | dict[str, LayerFactors], path: str) -> torch.Tensor:
    """``phi(A_a, A_b, i, j)`` for every ``i`` in ``1..r_a`` and ``j`` in ``1..r_b`` (row ``i-1``, column ``j-1``).

    The paper's heatmap (its Figure 3) for one layer, computed from one ``r_a x r_b`` product.
    """
    fa, fb = _as_factors(a), _as_factors(b)
    if path not in fa or path not in fb:
        raise ValueError(f"Layer {path!r} is not in both adapters; shared layers: {_common_paths(fa, fb)[:5]}...")
    overlap = (_right_singular_vectors(fa[path].A) @ _right_singular_vectors(fb[path].A).T).pow(2)
    cumulative = overlap.cumsum(0).cumsum(1)
    i = torch.arange(1, overlap.shape[0] + 1, dtype=overlap.dtype).unsqueeze(1)
    j = torch.arange(1, overlap.shape[1] + 1, dtype=overlap.dtype).unsqueeze(0)
    return cumulative / torch.minimum(i, j)
