"""Rank analysis: spectra via the r x r core, effective rank, energy, the LoRA paper's phi, the CLI."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import make_llama

from hf_lora import LoRAConfig, wrap
from hf_lora.analysis import (
    LayerFactors,
    delta_singular_values,
    effective_rank,
    energy_captured,
    layer_group,
    load_factors,
    numerical_rank,
    rank_for_energy,
    similarity_grid,
    spectra,
    subspace_similarity,
    summarize,
)
from hf_lora.cli import main


def _orthonormal(rows: int, cols: int, seed: int) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
    return q


def _constructed(singular_values: list[float], r: int, out: int = 40, inp: int = 30, scaling: float = 2.0) -> LayerFactors:
    """An adapter whose delta is exactly ``U diag(s) V^T`` (zero rows pad it to rank ``r``)."""
    k = len(singular_values)
    u, v = _orthonormal(out, r, 1), _orthonormal(inp, k, 2)
    a = torch.zeros(r, inp, dtype=torch.float64)
    a[:k] = torch.diag(torch.tensor(singular_values, dtype=torch.float64) / scaling) @ v.T
    return LayerFactors(a, u, scaling)


def _wrapped(seed: int, r: int = 4):
    model = make_llama(seed=0)
    torch.manual_seed(seed)  # the factors' init draws from the global generator
    return wrap(model, LoRAConfig(r=r, lora_alpha=2 * r, init_lora_weights=False, target_modules=["attention", "mlp"]))


def test_core_svd_matches_dense_svd():
    g = torch.Generator().manual_seed(0)
    f = LayerFactors(torch.randn(6, 50, generator=g, dtype=torch.float64), torch.randn(70, 6, generator=g, dtype=torch.float64), 0.5)
    dense = torch.linalg.svdvals(f.scaling * f.B @ f.A)[:6]
    torch.testing.assert_close(delta_singular_values(f), dense, rtol=1e-10, atol=1e-10)


def test_constructed_rank_k_delta():
    # rank 3 with equal singular values inside a rank-8 adapter
    values = delta_singular_values(_constructed([1.5, 1.5, 1.5], r=8))
    assert values.shape == (8,)
    torch.testing.assert_close(values[:3], torch.full((3,), 1.5, dtype=torch.float64))
    assert numerical_rank(values) == 3
    assert effective_rank(values) == pytest.approx(3.0, abs=1e-6)
    assert energy_captured(values, 3) == pytest.approx(1.0)
    # unequal values: same numerical rank, smaller effective rank
    decaying = delta_singular_values(_constructed([4.0, 1.0, 0.25], r=8))
    assert numerical_rank(decaying) == 3
    p = torch.tensor([4.0, 1.0, 0.25]) / 5.25
    assert effective_rank(decaying) == pytest.approx(math.exp(float(-(p * p.log()).sum())), rel=1e-6)
    assert 1.0 < effective_rank(decaying) < 2.0
    assert numerical_rank(torch.zeros(4)) == 0 and effective_rank(torch.zeros(4)) == 0.0


def test_energy_on_constructed_example():
    values = delta_singular_values(_constructed([3.0, 2.0, 1.0], r=4))
    torch.testing.assert_close(values, torch.tensor([3.0, 2.0, 1.0, 0.0], dtype=torch.float64), atol=1e-10, rtol=0)
    assert energy_captured(values, 0) == 0.0
    assert energy_captured(values, 1) == pytest.approx(9 / 14)
    assert energy_captured(values, 2) == pytest.approx(13 / 14)
    assert rank_for_energy(values, 0.9) == 2  # 13/14 = 0.929 >= 0.9 > 9/14
    assert rank_for_energy(values, 0.95) == 3
    assert rank_for_energy(values, 13 / 14) == 2  # exactly reaching the target is enough
    with pytest.raises(ValueError, match=r"energy=1.5 is invalid: expected a fraction in \(0, 1\]"):
        rank_for_energy(values, 1.5)
    with pytest.raises(ValueError, match="k=-1 is invalid"):
        energy_captured(values, -1)


def test_summary_per_group():
    factors = {
        "model.layers.0.self_attn.q_proj": _constructed([3.0, 2.0, 1.0], r=4),
        "model.layers.1.self_attn.q_proj": _constructed([1.0], r=4),
        "model.layers.0.mlp.up_proj": _constructed([1.0, 1.0, 1.0, 1.0], r=4),
    }
    rows = {s.group: s for s in summarize(factors)}
    assert list(rows) == ["self_attn.q_proj", "mlp.up_proj"]
    q = rows["self_attn.q_proj"]
    assert (q.layers, q.r, q.layer_ranks) == (2, 4, (1, 2))
    # group energy per direction: 9+1, 4, 1 of 15 -> top-1 keeps 0.667, top-2 0.933
    assert q.recommended_rank == 2
    assert q.top1_energy == pytest.approx((9 / 14 + 1.0) / 2)
    assert rows["mlp.up_proj"].recommended_rank == 4
    assert rows["mlp.up_proj"].effective_rank == pytest.approx(4.0)


def test_layer_group():
    assert layer_group("model.layers.3.self_attn.q_proj") == "self_attn.q_proj"
    assert layer_group("transformer.h.0.mlp.c_proj") == "mlp.c_proj"
    assert layer_group("model.embed_tokens") == "model.embed_tokens"


def test_folder_and_model_agree_with_dense_svd(tmp_path):
    model = _wrapped(seed=0)
    model.save_pretrained(str(tmp_path / "a"))
    from_model, from_folder = spectra(model), spectra(str(tmp_path / "a"))
    assert sorted(from_model) == sorted(from_folder) and len(from_model) == 14
    layer = model.base_model.model.layers[1].mlp.down_proj
    dense = torch.linalg.svdvals(layer.delta_weight().double())[:4]
    torch.testing.assert_close(from_folder["model.layers.1.mlp.down_proj"], dense, rtol=1e-5, atol=1e-7)
    for path in from_model:
        torch.testing.assert_close(from_model[path], from_folder[path])


def test_phi_of_an_adapter_with_itself_is_one():
    model = _wrapped(seed=0)
    assert all(phi == pytest.approx(1.0, abs=1e-9) for phi in subspace_similarity(model, model).values())
    # the top-2 subspace lies inside the top-4 one
    assert all(phi == pytest.approx(1.0, abs=1e-9) for phi in subspace_similarity(model, model, i=2, j=4).values())


def test_phi_of_independent_random_adapters_is_r_over_d():
    # For A with i.i.d. entries, E[phi(i=j=r)] = r / in_features exactly (E[projection] = (r/d) I).
    # At r=16 one layer's phi has relative std ~ sqrt(2)/r = 9%; over 14 layers the mean ratio
    # phi / (r/d) has std ~2.4%, so [0.9, 1.1] is a > 4 sigma band.
    a, b = _wrapped(seed=1, r=16), _wrapped(seed=2, r=16)
    phis = subspace_similarity(a, b)
    widths = {path: f.A.shape[1] for path, f in load_factors(a).items()}
    ratios = [phi / (16 / widths[path]) for path, phi in phis.items()]
    assert widths["model.layers.0.mlp.down_proj"] == 128 and widths["model.layers.0.self_attn.q_proj"] == 64
    assert 0.9 < sum(ratios) / len(ratios) < 1.1
    assert max(phis.values()) < 0.5  # far from the 1.0 of identical subspaces


def test_similarity_grid_matches_pointwise_phi():
    a, b = _wrapped(seed=1, r=4), _wrapped(seed=2, r=8)
    path = "model.layers.0.self_attn.v_proj"
    grid = similarity_grid(a, b, path)
    assert grid.shape == (4, 8)
    for i, j in [(1, 1), (2, 5), (4, 8), (3, 2)]:
        assert grid[i - 1, j - 1].item() == pytest.approx(subspace_similarity(a, b, i=i, j=j)[path], rel=1e-9)
    assert subspace_similarity(a, b)[path] == pytest.approx(grid[3, 3].item())  # default i = j = min(r) = 4
    self_grid = similarity_grid(a, a, path)
    torch.testing.assert_close(self_grid.diagonal(), torch.ones(4, dtype=torch.float64))


def test_errors_name_the_bad_value(tmp_path):
    a = _wrapped(seed=1, r=4)
    with pytest.raises(ValueError, match=r"i=5 is invalid for layer 'model.layers.0.self_attn.q_proj': expected an integer in \[1, 4\]"):
        subspace_similarity(a, a, i=5)
    with pytest.raises(ValueError, match="Expected an adapter folder, a Hub id or a LoRAModelWrapper, got int"):
        load_factors(3)
    with pytest.raises(ValueError, match="does not exist"):
        load_factors(str(tmp_path / "nope"))
    with pytest.raises(ValueError, match="not in both adapters"):
        similarity_grid(a, a, "model.layers.9.q_proj")


def test_cli_analyze_prints_table_and_writes_figures(tmp_path, capsys):
    _wrapped(seed=1, r=4).save_pretrained(str(tmp_path / "r4"))
    _wrapped(seed=2, r=8).save_pretrained(str(tmp_path / "r8"))
    plot = tmp_path / "rank.png"
    assert main(["analyze", str(tmp_path / "r4"), "--compare", str(tmp_path / "r8"), "--plot", str(plot)]) == 0
    out = capsys.readouterr().out
    rows = {line.split()[0]: line.split() for line in out.splitlines() if line.startswith(("self_attn.", "mlp."))}
    assert set(rows) == {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                         "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"}
    q_proj = rows["self_attn.q_proj"]
    assert q_proj[1:3] == ["2", "4"]  # layers, r
    assert 0.0 < float(q_proj[-1]) < 0.5  # phi of independent adapters
    for figure in (plot, tmp_path / "rank_similarity.png"):
        assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["analyze", str(tmp_path / "missing")]) == 2
