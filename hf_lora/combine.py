"""Combine loaded adapters into a new one: ``delta_new = sum_i w_i * delta_i`` per layer.

* ``"cat"`` is exact: stack the factors, ``A = [A_1; A_2; ...]`` and
  ``B = [w_1 s_1 B_1, w_2 s_2 B_2, ...]`` (``s_i`` the scaling), so ``B A`` is the weighted sum.
  The rank is the sum of the ranks.
* ``"svd"`` keeps the best rank-``k`` approximation of the weighted sum (Eckart-Young). It never
  builds the dense ``out x in`` sum: the stacked factors give ``delta = B_cat A_cat``, and thin
  QR of ``B_cat`` and ``A_cat^T`` reduces the SVD to a small ``R x R`` core (``R = sum r_i``).
  The result is split evenly, ``B = U sqrt(S)``, ``A = sqrt(S) V^T``.

The new adapter's scaling is 1 (``lora_alpha = r`` for every layer), so its saved file means
exactly the combined delta to both hf_lora and PEFT.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Literal

import torch

from .adapters import StoredAdapter, _check_known, _slots, _sync_active, bank, check_adapter_name, register

if TYPE_CHECKING:
    from .model import LoRAModelWrapper

CombineMethod = Literal["cat", "svd"]


def combine_factors(
    parts: Sequence[tuple[torch.Tensor, torch.Tensor, float]], method: CombineMethod, rank: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Factors ``(A, B)`` with ``B @ A == sum_i c_i * B_i @ A_i`` (``"cat"``) or its best rank-``rank`` fit.

    Args:
        parts: ``(A_i, B_i, c_i)`` with ``A_i``: ``r_i x in``, ``B_i``: ``out x r_i``.
        method: ``"cat"`` or ``"svd"``.
        rank: Rank of the ``"svd"`` result (default: the largest ``r_i``); zero-padded when the
            sum has fewer directions.

    Returns:
        ``(A, B)`` in float64.
    """
    a_cat = torch.cat([a.double() for a, _, _ in parts], 0)
    b_cat = torch.cat([b.double() * c for _, b, c in parts], 1)
    if method == "cat":
        return a_cat, b_cat
    k = rank if rank is not None else max(a.shape[0] for a, _, _ in parts)
    q_b, r_b = torch.linalg.qr(b_cat)
    q_a, r_a = torch.linalg.qr(a_cat.T)
    u, s, vh = torch.linalg.svd(r_b @ r_a.T)
    keep = min(k, s.numel())
    root = s[:keep].sqrt()
    b_new = b_cat.new_zeros(b_cat.shape[0], k)
    a_new = a_cat.new_zeros(k, a_cat.shape[1])
    b_new[:, :keep] = (q_b @ u[:, :keep]) * root
    a_new[:keep] = root.unsqueeze(1) * (vh[:keep] @ q_a.T)
    return a_new, b_new


def _check_arguments(names: Sequence[str], weights: Sequence[float], method: str, rank: int | None) -> None:
    if isinstance(names, str) or not names:
        raise ValueError(f"adapters={names!r} is invalid: expected a non-empty list of loaded adapter names.")
    if isinstance(weights, (str, bytes)) or len(weights) != len(names):
        raise ValueError(f"weights={weights!r} is invalid: expected one number per adapter ({len(names)}).")
    for weight in weights:
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
            raise ValueError(f"weights={list(weights)!r} is invalid: expected finite numbers.")
    if method not in ("cat", "svd"):
        raise ValueError(f"method={method!r} is invalid: expected 'cat' or 'svd'.")
    if rank is not None and (method != "svd" or isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
        raise ValueError(f"rank={rank!r} is invalid: expected None or a positive integer, and only with method='svd'.")


def add_weighted_adapter(
    wrapper: LoRAModelWrapper, adapters: Sequence[str], weights: Sequence[float], name: str,
    method: CombineMethod = "cat", rank: int | None = None,
) -> None:
    """Register ``name`` = the weighted combination of loaded ``adapters`` (inactive; see module doc).

    Raises:
        ValueError: Unknown adapter, bad weights/method/rank, a taken or invalid name, or adapters
            holding state other than LoRA factors (``modules_to_save`` copies, trained biases),
            which has no meaningful weighted combination.
    """
    _check_arguments(adapters, weights, method, rank)
    check_adapter_name(name)
    found = bank(wrapper)
    for adapter in adapters:
        _check_known(found, adapter)
    slots = _slots(wrapper)
    others = [path for path, (_, slot) in slots.items() if slot is None or slot.rank_dim is None]
    if others:
        raise ValueError(f"Only LoRA factors can be combined, but the adapters also hold {others[:3]} "
                         "(modules_to_save or trained biases).")
    _sync_active(wrapper, found)
    factor_paths: dict[str, dict[int, str]] = {}
    for path, (_, slot) in slots.items():
        factor_paths.setdefault(slot.layer_path, {})[slot.rank_dim] = path
    tensors, ranks = {}, {}
    for layer_path, pair in factor_paths.items():
        parts = []
        for adapter, weight in zip(adapters, weights):
            entry = found.entries[adapter]
            parts.append((entry.tensors[pair[0]], entry.tensors[pair[1]], weight * entry.scalings[layer_path]))
        a, b = combine_factors(parts, method, rank)
        dtype = slots[pair[0]][0].dtype
        tensors[pair[0]], tensors[pair[1]] = a.to(dtype), b.to(dtype)
        ranks[layer_path] = int(a.shape[0])
    common = Counter(ranks.values()).most_common(1)[0][0]
    pattern = {path: r for path, r in ranks.items() if r != common}
    first = found.entries[adapters[0]].config
    config = replace(first, r=common, lora_alpha=common, rank_pattern=pattern, alpha_pattern=dict(pattern),
                     use_rslora=False, init_lora_weights=True)
    register(wrapper, name, StoredAdapter(config, tensors, ranks, {path: 1.0 for path in ranks}), f"add_weighted_adapter({name!r})")
