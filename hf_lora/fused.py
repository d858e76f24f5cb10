"""The fast path of `LoRALinear.forward`: the adapter branch as one autograd node.

Run through plain autograd, ``result + B(A(dropout(x)) * scaling)`` stores for every adapted
layer the dropped copy of the input and its mask (q, k and v read the same input, so three
copies), and draws one random number per input element. `adapter_update` computes the same
maths with one custom `torch.autograd.Function` that

* saves only ``x`` (which the layer's neighbours usually hold already, so it costs nothing
  extra), the two factors and the rank-r intermediate;
* stores a 63-bit seed instead of the mask and regenerates the mask in backward;
* draws the mask cheaply on CPU: the *positions* of dropped elements are sampled directly,
  as cumulative sums of geometric gaps (the gaps between failures of i.i.d. Bernoulli trials
  are geometric), so it costs ``p * numel`` random numbers instead of ``numel``; on other
  devices it uses ``bernoulli_`` with a seeded generator;
* folds ``1 / (1 - p)`` into ``scaling`` on the rank-r intermediate;
* for a plain frozen ``nn.Linear`` base, runs the base matmul inside the same node, so the
  update accumulates into the base output (``addmm_``) and the adapter's share of the input
  gradient into the base's (no extra full-size tensor, no autograd sum); for other bases
  (bitsandbytes, ``Conv1D``, hooked) it adds into their output, in place where that is safe.

`applies` says whether a layer and its inputs qualify; `LoRALinear.forward` uses the plain
formula otherwise. The seed comes from torch's global CPU generator, so ``torch.manual_seed``
makes runs reproducible and activation checkpointing (which restores the RNG state before
recomputing) replays the same mask.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["adapter_update", "applies", "draw_seed", "drop_positions", "dropout_keep_mask", "enabled", "use_fused"]

_ENABLED = True
_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Base layers whose output nothing else saves for backward, so it may be updated in place.
_INPLACE_BASES = ("torch.nn.modules.linear.Linear", "bitsandbytes.nn.modules.Linear4bit",
                  "bitsandbytes.nn.modules.Linear8bitLt")


def enabled() -> bool:
    """Whether the fast path is switched on (it is by default)."""
    return _ENABLED


@contextlib.contextmanager
def use_fused(on: bool) -> Iterator[None]:
    """Switch the fast path on or off inside a ``with`` block (benchmarks, debugging).

    Args:
        on: ``False`` makes every `LoRALinear` run the plain autograd formula.
    """
    global _ENABLED
    previous, _ENABLED = _ENABLED, bool(on)
    try:
        yield
    finally:
        _ENABLED = previous


def draw_seed() -> int:
    """A dropout seed drawn from torch's global CPU generator (reproducible, checkpoint-safe)."""
    return int(torch.randint(2**62, (), dtype=torch.int64).item())


def drop_positions(numel: int, p: float, seed: int) -> torch.Tensor:
    """Sorted flat indices of the elements an i.i.d. Bernoulli(``p``) dropout zeroes (CPU).

    Gaps between successive drops are geometric: ``gap = floor(log(1 - u) / log(1 - p)) + 1``
    for uniform ``u``. The float32 uniforms make the law exact up to a 2**-24 tail, the same
    resolution CUDA's own dropout uses.

    Args:
        numel: Number of elements of the (flattened) tensor.
        p: Drop probability in ``(0, 1)``.
        seed: Seed of the private generator; the same seed gives the same positions.
    """
    generator = torch.Generator()
    generator.manual_seed(seed)
    log_keep = math.log1p(-p)
    chunks: list[torch.Tensor] = []
    last = -1
    while last < numel:  # almost always one round; more only deep in the binomial tail
        expected = (numel - last) * p
        draws = int(expected + 8 * math.sqrt(expected) + 16)
        uniform = torch.rand(draws, generator=generator)
        gaps = uniform.neg_().log1p_().div_(log_keep).floor_().to(torch.int64).add_(1)
        positions = gaps.cumsum_(0).add_(last)
        chunks.append(positions)
        last = int(positions[-1])
    positions = torch.cat(chunks) if len(chunks) > 1 else chunks[0]
    return positions[: int(torch.searchsorted(positions, numel))]


def dropout_keep_mask(shape: torch.Size, p: float, seed: int, device: torch.device) -> torch.Tensor:
    """The boolean keep-mask the fast path uses for ``seed`` (for tests and inspection)."""
    keep = torch.ones(shape, dtype=torch.bool, device=device)
    return _zero_dropped_(keep, _drop_mask(keep, p, seed))


def _samples_positions(device: torch.device) -> bool:
    # Sampling drop positions pays off where random numbers are drawn serially: on CPU.
    return device.type == "cpu"


def _drop_mask(like: torch.Tensor, p: float, seed: int) -> torch.Tensor:
    """What dropout ``(p, seed)`` drops from a tensor shaped like ``like``: flat drop positions
    on CPU, a boolean keep-mask elsewhere (where ``bernoulli_`` runs in parallel)."""
    if _samples_positions(like.device):
        return drop_positions(like.numel(), p, seed)
    generator = torch.Generator(device=like.device)
    generator.manual_seed(seed)
    return torch.empty(like.shape, dtype=torch.bool, device=like.device).bernoulli_(1 - p, generator=generator)


def _zero_dropped_(t: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Zero, in place, the elements of contiguous ``t`` that ``mask`` (from `_drop_mask`) drops."""
    if mask.dtype == torch.bool:
        return t.mul_(mask)
    return t.view(-1).index_fill_(0, mask, 0).view(t.shape)


def _dropped_input(x2d: torch.Tensor, dtype: torch.dtype, mask: torch.Tensor | None) -> torch.Tensor:
    """``x2d`` in ``dtype`` with dropped elements zeroed (not rescaled), never aliasing ``x2d``."""
    if mask is None:
        return x2d.to(dtype)
    copy = x2d.to(dtype, copy=True, memory_format=torch.contiguous_format)
    return _zero_dropped_(copy, mask)


def _autocast_off(device_type: str) -> contextlib.AbstractContextManager:
    # The casts are explicit here; entering autocast's context costs microseconds per call.
    if torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


@dataclass(frozen=True)
class _Plan:
    """The non-tensor arguments of one fused call."""

    scale: float  # scaling / (1 - p)
    p: float
    seed: int
    dtype: torch.dtype  # adapter matmuls
    base_dtype: torch.dtype | None  # base matmul, when the base is computed here
    inplace: bool  # add into the given base output in place


class _LoRALinear(torch.autograd.Function):
    """``base(x) + scale * (drop(x) @ A.T) @ B.T``; the base is computed here or passed in."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, result: torch.Tensor | None, x: torch.Tensor, weight_a: torch.Tensor, weight_b: torch.Tensor,
        base_weight: torch.Tensor | None, base_bias: torch.Tensor | None, plan: _Plan,
    ) -> torch.Tensor:
        dtype = plan.dtype
        with _autocast_off(x.device.type):
            x2d = x.reshape(-1, x.shape[-1])
            if base_weight is not None:  # our own fresh output: always updated in place
                bias = None if base_bias is None else base_bias.to(plan.base_dtype)
                out2d = F.linear(x2d.to(plan.base_dtype), base_weight.to(plan.base_dtype), bias)
            else:
                out2d = result.view(-1, result.shape[-1]) if plan.inplace else result.reshape(-1, result.shape[-1])
            inplace = plan.inplace or base_weight is not None
            mask = _drop_mask(x2d, plan.p, plan.seed) if plan.p else None
            hidden = (_dropped_input(x2d, dtype, mask) @ weight_a.to(dtype).t()).mul_(plan.scale)
            b_t = weight_b.to(dtype).t()
            if out2d.dtype == dtype:
                out2d = out2d.addmm_(hidden, b_t) if inplace else torch.addmm(out2d, hidden, b_t)
            else:
                out2d = out2d.add_(hidden @ b_t) if inplace else out2d + (hidden @ b_t).to(out2d.dtype)
        ctx.save_for_backward(x, weight_a, weight_b, hidden, base_weight)
        ctx.plan, ctx.bias_dtype = plan, None if base_bias is None else base_bias.dtype
        if base_weight is None and plan.inplace:
            ctx.mark_dirty(result)
            return result
        return out2d.view(*x.shape[:-1], out2d.shape[-1])

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, weight_a, weight_b, hidden, base_weight = ctx.saved_tensors
        plan, needs = ctx.plan, ctx.needs_input_grad
        dtype = plan.dtype
        grad_x = grad_a = grad_b = grad_bias = None
        with _autocast_off(x.device.type):
            g2d = grad_out.reshape(-1, grad_out.shape[-1])
            g_adapter = g2d.to(dtype)
            if needs[3]:
                grad_b = (hidden.t() @ g_adapter).t().to(weight_b.dtype)  # faster than g.T @ h on CPU
            if needs[1] or needs[2]:
                grad_hidden = (g_adapter @ weight_b.to(dtype)).mul_(plan.scale)
                x2d = x.reshape(-1, x.shape[-1])
                mask = _drop_mask(x2d, plan.p, plan.seed) if plan.p else None  # regenerated, not stored
                if needs[2]:
                    grad_a = (grad_hidden.t() @ _dropped_input(x2d, dtype, mask)).to(weight_a.dtype)
                if needs[1]:
                    grad_x = _input_grad(g2d, grad_hidden, weight_a.to(dtype), base_weight, plan, mask)
                    grad_x = grad_x.to(x.dtype).view(x.shape)
            if needs[5]:
                grad_bias = g2d.sum(0).to(ctx.bias_dtype)
        grad_result = grad_out if needs[0] else None
        return grad_result, grad_x, grad_a, grad_b, None, grad_bias, None


def _input_grad(
    g2d: torch.Tensor, grad_hidden: torch.Tensor, weight_a: torch.Tensor, base_weight: torch.Tensor | None,
    plan: _Plan, mask: torch.Tensor | None,
) -> torch.Tensor:
    """Gradient of the input: the adapter's share, plus the base's when the base ran here."""
    if base_weight is None:
        grad = grad_hidden @ weight_a
        return grad if mask is None else _zero_dropped_(grad, mask)
    grad = g2d.to(plan.base_dtype) @ base_weight.to(plan.base_dtype)
    if mask is None and grad.dtype == grad_hidden.dtype:
        return grad.addmm_(grad_hidden, weight_a)  # no separate tensor for the adapter's share
    adapter = grad_hidden @ weight_a
    return grad.add_(adapter if mask is None else _zero_dropped_(adapter, mask))


def _plain(module: nn.Module, *types: type) -> bool:
    # Hooks or an instance-level forward (accelerate's offload hooks) would be bypassed.
    return (type(module) in types and not module._forward_hooks and not module._forward_pre_hooks
            and "forward" not in module.__dict__)


def _qualname(module: nn.Module) -> str:
    cls = type(module)
    return f"{cls.__module__}.{cls.__qualname__}"


def _base_dtype(base: nn.Module, x: torch.Tensor) -> torch.dtype | None:
    """The dtype the base ``nn.Linear`` computes in for ``x``, or ``None`` if it cannot be fused."""
    if not _plain(base, nn.Linear):
        return None
    weight, bias = base._parameters["weight"], base._parameters["bias"]  # skips Module.__getattr__
    if type(weight) is not nn.Parameter or weight.requires_grad:
        return None
    if weight.dtype not in _FLOAT_DTYPES or weight.device != x.device:
        return None
    if bias is not None and (type(bias) is not nn.Parameter or bias.dtype != weight.dtype):
        return None
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return weight.dtype if x.dtype == weight.dtype else None


def applies(layer: nn.Module, x: torch.Tensor, result: torch.Tensor | None) -> bool:
    """Whether `adapter_update` computes exactly what the plain formula would for this call.

    With ``result=None`` the question is whether the base layer can be computed inside the
    fused node too (a plain, frozen ``nn.Linear``). Never for tensor subclasses,
    ``torch.compile`` tracing, hooked or replaced submodules, unusual dtypes, mixed devices, or
    a base output of an unexpected shape.
    """
    lora_a, lora_b, dropout = layer.lora_A, layer.lora_B, layer.lora_dropout
    if not _ENABLED or torch.compiler.is_compiling() or torch.jit.is_scripting():
        return False
    if type(x) is not torch.Tensor or not (result is None or type(result) is torch.Tensor):
        return False
    if not (_plain(lora_a, nn.Linear) and _plain(lora_b, nn.Linear) and _plain(dropout, nn.Dropout, nn.Identity)):
        return False
    if lora_a.bias is not None or lora_b.bias is not None or getattr(dropout, "inplace", False):
        return False
    weight_a, weight_b = lora_a.weight, lora_b.weight
    if type(weight_a) is not nn.Parameter or type(weight_b) is not nn.Parameter:
        return False
    if weight_a.dtype != weight_b.dtype or weight_a.dtype not in _FLOAT_DTYPES:
        return False
    if x.dtype not in _FLOAT_DTYPES or x.numel() == 0 or x.shape[-1] != weight_a.shape[1]:
        return False
    if not (x.device == weight_a.device == weight_b.device):
        return False
    if isinstance(dropout, nn.Dropout) and dropout.training and dropout.p >= 1:
        return False
    if result is None:
        return _base_dtype(layer.base_layer, x) is not None and layer.base_layer.out_features == weight_b.shape[0]
    return (result.dtype in _FLOAT_DTYPES and result.device == x.device
            and result.shape == x.shape[:-1] + (weight_b.shape[0],))


def adapter_update(layer: nn.Module, x: torch.Tensor, result: torch.Tensor | None) -> torch.Tensor:
    """``base(x) + B(A(dropout(x)) * scaling)`` for a `LoRALinear`; call only when `applies`.

    Args:
        layer: The LoRA layer (its ``base_layer``, ``lora_A``, ``lora_B``, ``lora_dropout``,
            ``scaling``).
        x: The layer input.
        result: The base layer's output for ``x`` (updated in place when that is safe), or
            ``None`` to compute the base ``nn.Linear`` inside the fused node.

    Returns:
        The layer output, in the base output's dtype.
    """
    dropout = layer.lora_dropout
    p = float(dropout.p) if isinstance(dropout, nn.Dropout) and dropout.training else 0.0
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)  # what autocast would run lora_A/lora_B in
    else:
        dtype = layer.lora_A.weight.dtype
    base = layer.base_layer
    if result is None:
        base_dtype, inplace, base_weight, base_bias = _base_dtype(base, x), False, base.weight, base.bias
    else:
        base_dtype, base_weight, base_bias = None, None, None
        inplace = (result._base is None and result.is_contiguous() and result.data_ptr() != x.data_ptr()
                   and _qualname(base) in _INPLACE_BASES and not (result.is_leaf and result.requires_grad))
    plan = _Plan(layer.scaling / (1.0 - p), p, draw_seed() if p else 0, dtype, base_dtype, inplace)
    args = (result, x, layer.lora_A.weight, layer.lora_B.weight, base_weight, base_bias, plan)
    if not torch.is_grad_enabled():  # inference: the same maths without autograd's bookkeeping
        return _LoRALinear.forward(_NoBackward(), *args)
    return _LoRALinear.apply(*args)


class _NoBackward:
    """Stands in for autograd's ``ctx`` when no backward will run."""

    def save_for_backward(self, *tensors: torch.Tensor) -> None:
        pass

    def mark_dirty(self, *tensors: torch.Tensor) -> None:
        pass
