"""`LoRAConfig`: what to adapt and how, validated once at construction.

The field names are PEFT's (``r``, ``lora_alpha``, ``target_modules``...) so that an
``adapter_config.json`` written by either library reads in the other.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from types import MappingProxyType
from typing import Any, Literal

BiasMode = Literal["none", "all", "lora_only"]
InitMode = bool | str  # True, False, "gaussian", "pissa", "pissa_niter_<N>", "olora"

VALID_BIAS: tuple[str, ...] = ("none", "all", "lora_only")
VALID_INIT: tuple[object, ...] = (True, False, "gaussian", "pissa", "olora")
# Inits that rewrite the base weight to a residual (see hf_lora/init.py); "pissa_niter_<N>" too.
BASE_INITS: tuple[str, ...] = ("pissa", "olora")
_PISSA_NITER = re.compile(r"pissa_niter_([1-9][0-9]*)")
TARGET_GROUPS: tuple[str, ...] = ("attention", "mlp", "embedding", "all-linear")

# PEFT LoraConfig fields that change what the adapter computes. Loading a file that sets one of
# them to a non-default value would silently give wrong outputs, so it is refused instead.
_UNSUPPORTED_PEFT_FIELDS: dict[str, object] = {
    "layers_to_transform": None,
    "layers_pattern": None,
    "lora_bias": False,
    "layer_replication": None,
    "target_parameters": None,
    "alora_invocation_tokens": None,
    "use_qalora": False,
    "use_bdlora": None,
}
# Everything else PEFT writes is bookkeeping we may ignore.


def _fail(name: str, value: object, valid: str) -> ValueError:
    shown = repr(value)
    if len(shown) > 200:  # a hostile config file can hold megabytes in one field
        shown = f"{shown[:100]}...<{len(shown) - 150} characters>...{shown[-50:]}"
    return ValueError(f"LoRAConfig.{name}={shown} is invalid: expected {valid}.")


def _compiles(pattern: str) -> bool:
    try:
        re.compile(pattern)
    except re.error:
        return False
    return True


def _check_regex(name: str, pattern: str) -> None:
    try:
        re.compile(pattern)
    except re.error as exc:
        raise _fail(name, pattern, f"a valid regular expression ({exc})") from None
    _check_backtracking(name, pattern)


def _check_backtracking(name: str, pattern: str) -> None:
    """Refuse patterns whose matching time can explode, such as ``(.*)*x``.

    Patterns come from downloaded config files and Python's ``re`` has no timeout: a repetition
    inside a repetition (or an alternation inside one) makes a 40-character module path take
    longer than the universe's age to reject. Module patterns never need that shape.
    """
    try:
        from re import _parser as sre_parse  # type: ignore[attr-defined]  # Python >= 3.11
    except ImportError:  # pragma: no cover - Python 3.10
        import sre_parse  # type: ignore[no-redef]
    try:
        parsed = sre_parse.parse(pattern)
    except (re.error, RecursionError, OverflowError):
        return  # compile() above already accepted it; nothing more to learn
    constants = sre_parse  # opcode names are attributes of the parser module
    repeats = {constants.MAX_REPEAT, constants.MIN_REPEAT}

    def risky(items: Any, inside_repeat: bool) -> bool:
        for op, av in items:
            if op in repeats:
                _, high, body = av
                repeated = high > 1
                if (repeated and inside_repeat) or risky(body, inside_repeat or repeated):
                    return True
            elif op == constants.BRANCH:
                if inside_repeat or any(risky(branch, inside_repeat) for branch in av[1]):
                    return True
            elif op == constants.SUBPATTERN:
                if risky(av[-1], inside_repeat):
                    return True
            elif op in (constants.ASSERT, constants.ASSERT_NOT):
                if risky(av[1], inside_repeat):
                    return True
        return False

    if risky(parsed, False):
        raise _fail(name, pattern, "a regular expression without a repetition or alternation inside a repetition "
                                   "(such patterns can take exponential time to match)")


def _as_str_tuple(name: str, value: object, *, allow_none: bool) -> tuple[str, ...] | str | None:
    """Normalise a str-or-list field into an immutable form."""
    if value is None:
        if allow_none:
            return None
        raise _fail(name, value, "a module name, a regex string, or a list of names")
    if isinstance(value, str):
        if not value:
            raise _fail(name, value, "a non-empty string")
        _check_regex(name, value)
        return value
    if isinstance(value, Sequence) and not isinstance(value, (bytes, bytearray)):
        items = tuple(value)
        if not items:
            raise _fail(name, value, "a non-empty list of module names")
        for item in items:
            if not isinstance(item, str) or not item:
                raise _fail(name, value, "a list of non-empty strings")
        items = tuple(dict.fromkeys(items))  # duplicates change nothing but cost matching time
        if len(items) > MAX_LIST_ENTRIES:
            # Every entry is matched against every module path: a hostile list would stall loading.
            raise _fail(name, f"<list of {len(items)} names>",
                        f"at most {MAX_LIST_ENTRIES} entries; use a group or a regular expression")
        for item in items:  # entries are also tried as regular expressions when they compile
            if _compiles(item):
                _check_backtracking(name, item)
        return items
    raise _fail(name, value, "a string or a list of strings")


# Bounds that keep hostile config files from overflowing float maths; no layer is this wide.
MAX_RANK = 2**31 - 1
MAX_LIST_ENTRIES = 10_000
_MAX_NUMBER = 1e300


def _is_rank(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 < value <= MAX_RANK


def _is_positive_number(value: object) -> bool:
    return (
        isinstance(value, (int, float))
        and not isinstance(value, bool)
        and abs(value) <= _MAX_NUMBER  # huge ints would overflow float maths later
        and math.isfinite(value)
        and value > 0
    )


def _freeze_pattern(name: str, value: object, *, integer: bool) -> Mapping[str, Any]:
    if value is None:
        value = {}
    if not isinstance(value, Mapping):
        raise _fail(name, value, "a dict mapping module-name patterns to numbers")
    for key, val in value.items():
        if not isinstance(key, str) or not key:
            raise _fail(name, value, "non-empty string keys")
        _check_regex(name, key)
        ok = _is_rank(val) if integer else _is_positive_number(val)
        if not ok:
            kind = "positive integers" if integer else "positive finite numbers"
            raise _fail(name, value, f"{kind} as values (bad entry {key!r}: {val!r})")
    return MappingProxyType(dict(value))



def _token_id_tuple(name: str, value: object) -> tuple[int, ...]:
    ok = isinstance(value, Sequence) and not isinstance(value, (str, bytes)) and len(value) > 0
    if ok:
        ok = all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i <= MAX_RANK for i in value)
    if not ok or len(set(value)) != len(value):
        raise _fail(name, value, "a non-empty list of distinct non-negative token ids")
    return tuple(value)


def _token_indices(value: object) -> tuple[int, ...] | Mapping[str, tuple[int, ...]] | None:
    """Normalise ``trainable_token_indices`` (list, or dict of module name -> list)."""
    if value is None:
        return None
    name = "trainable_token_indices"
    if isinstance(value, Mapping):
        if not value or not all(isinstance(k, str) and k for k in value):
            raise _fail(name, value, "a non-empty dict with module-name keys")
        return MappingProxyType({k: _token_id_tuple(name, v) for k, v in value.items()})
    return _token_id_tuple(name, value)


@dataclass(frozen=True, kw_only=True)
class LoRAConfig:
    """How LoRA adapts a model: ``W x + (lora_alpha / r) * B A x``.

    Args:
        r: Rank of the update; ``A`` is ``r x in``, ``B`` is ``out x r``.
        lora_alpha: Numerator of the scaling ``lora_alpha / r`` (``/ sqrt(r)`` with ``use_rslora``).
        lora_dropout: Dropout probability applied to the adapter's input, in ``[0, 1)``.
        target_modules: Which modules get adapters. A list entry is a group
            (``"attention"``, ``"mlp"``, ``"embedding"``, ``"all-linear"``, resolved per
            architecture), a module name matched as a suffix of the full path (``"q_proj"``,
            ``"self_attn.q_proj"``), or a full-path regular expression. A plain string is a
            group or a full-path regex, as in PEFT.
        exclude_modules: Same syntax; matching modules are never adapted.
        bias: ``"none"``, ``"all"`` (train every bias) or ``"lora_only"`` (biases of adapted layers).
        use_rslora: Rank-stabilised scaling ``lora_alpha / sqrt(r)``.
        use_dora: Weight-decomposed LoRA (DoRA): a trained magnitude per output feature times
            the normalised direction ``W + scaling * B A`` (see ``hf_lora/dora.py``).
        init_lora_weights: ``True``: A kaiming-uniform, B zero (PEFT's default);
            ``"gaussian"``: A ~ N(0, (1/r)^2), B zero; ``False``: both random (tests only:
            a fresh adapter then changes the outputs). ``"pissa"`` / ``"pissa_niter_<N>"`` /
            ``"olora"`` build A and B from the base weight (SVD / randomized SVD with N
            iterations / QR) and leave the residual in the base (see ``hf_lora/init.py``).
        rank_pattern: ``{pattern: r}`` overrides per module; a pattern matches a module when it
            equals the path, is a suffix of it, or full-matches it as a regex.
        alpha_pattern: ``{pattern: alpha}`` overrides, same matching.
        trainable_token_indices: Token ids whose embedding rows are trainable (and saved alone,
            never the whole matrix): a list for the input embedding, or ``{module: ids}``. For
            tokens added with ``resize_token_embeddings``; see ``hf_lora/tokens.py``.
        modules_to_save: Modules trained in full and saved next to the adapter (e.g. a
            classification head). Matched by name suffix.
        fan_in_fan_out: The base weight is stored ``in x out`` (GPT-2 ``Conv1D``). Detected
            per layer; kept only for PEFT round trips.
        task_type: PEFT task type written to ``adapter_config.json`` (``"CAUSAL_LM"`` etc.);
            filled from the model class when ``None``.
    """

    r: int = 8
    lora_alpha: float = 16
    lora_dropout: float = 0.05
    target_modules: str | tuple[str, ...] = ("attention", "mlp")
    exclude_modules: str | tuple[str, ...] | None = None
    bias: BiasMode = "none"
    use_rslora: bool = False
    use_dora: bool = False
    init_lora_weights: InitMode = True
    rank_pattern: Mapping[str, int] = field(default_factory=dict)
    alpha_pattern: Mapping[str, float] = field(default_factory=dict)
    modules_to_save: tuple[str, ...] | None = None
    trainable_token_indices: tuple[int, ...] | Mapping[str, tuple[int, ...]] | None = None
    fan_in_fan_out: bool = False
    task_type: str | None = None

    def __post_init__(self) -> None:
        set_ = object.__setattr__  # frozen: normalised values are written once, here
        if not _is_rank(self.r):
            raise _fail("r", self.r, f"a positive integer up to {MAX_RANK} (typical values: 4, 8, 16, 64)")
        if not _is_positive_number(self.lora_alpha):
            raise _fail("lora_alpha", self.lora_alpha, "a positive finite number (commonly 2 * r)")
        dropout = self.lora_dropout
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
            raise _fail("lora_dropout", dropout, "a probability in [0, 1)")
        set_(self, "lora_dropout", float(dropout))
        set_(self, "target_modules", _as_str_tuple("target_modules", self.target_modules, allow_none=False))
        set_(self, "exclude_modules", _as_str_tuple("exclude_modules", self.exclude_modules, allow_none=True))
        if self.bias not in VALID_BIAS:
            raise _fail("bias", self.bias, f"one of {', '.join(map(repr, VALID_BIAS))}")
        if not isinstance(self.use_rslora, bool):
            raise _fail("use_rslora", self.use_rslora, "True or False")
        if not isinstance(self.use_dora, bool):
            raise _fail("use_dora", self.use_dora, "True or False")
        init = self.init_lora_weights
        known = any(init is v or (isinstance(v, str) and init == v) for v in VALID_INIT)
        if not known and not (isinstance(init, str) and _PISSA_NITER.fullmatch(init)):
            raise _fail("init_lora_weights", init, "True, False, 'gaussian', 'pissa', 'pissa_niter_<N>' (N >= 1) or 'olora'")
        set_(self, "rank_pattern", _freeze_pattern("rank_pattern", self.rank_pattern, integer=True))
        set_(self, "alpha_pattern", _freeze_pattern("alpha_pattern", self.alpha_pattern, integer=False))
        set_(self, "trainable_token_indices", _token_indices(self.trainable_token_indices))
        modules = _as_str_tuple("modules_to_save", self.modules_to_save, allow_none=True)
        set_(self, "modules_to_save", (modules,) if isinstance(modules, str) else modules)
        if not isinstance(self.fan_in_fan_out, bool):
            raise _fail("fan_in_fan_out", self.fan_in_fan_out, "True or False")
        if self.task_type is not None and not isinstance(self.task_type, str):
            raise _fail("task_type", self.task_type, "None or a PEFT task type string such as 'CAUSAL_LM'")

    # --- per-module values -------------------------------------------------------------------

    def rank_for(self, module_name: str) -> int:
        """Rank of the adapter on ``module_name`` (``rank_pattern`` first, else ``r``)."""
        return int(_lookup_pattern(self.rank_pattern, module_name, self.r))

    def alpha_for(self, module_name: str) -> float:
        """``lora_alpha`` for ``module_name`` (``alpha_pattern`` first)."""
        return float(_lookup_pattern(self.alpha_pattern, module_name, self.lora_alpha))

    def scaling_for(self, module_name: str) -> float:
        """``alpha / r`` or, with rsLoRA, ``alpha / sqrt(r)``."""
        rank = self.rank_for(module_name)
        denominator = math.sqrt(rank) if self.use_rslora else rank
        return self.alpha_for(module_name) / denominator

    # --- serialisation --------------------------------------------------------------------------

    def __reduce__(self) -> tuple[Any, ...]:
        # The read-only mapping fields cannot be pickled; rebuild from the plain dict instead, so
        # pickle and copy.deepcopy work on configs and on wrapped models.
        return (_rebuild, (type(self), self.to_dict()))

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict of the fields."""
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        for key in ("rank_pattern", "alpha_pattern"):
            out[key] = dict(out[key])
        tokens = out["trainable_token_indices"]
        if tokens is not None:
            out["trainable_token_indices"] = {k: list(v) for k, v in tokens.items()} if isinstance(tokens, Mapping) else list(tokens)
        for key in ("target_modules", "exclude_modules", "modules_to_save"):
            if isinstance(out[key], tuple):
                out[key] = list(out[key])
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, source: str = "adapter config") -> LoRAConfig:
        """Build a config from an ``adapter_config.json`` dict (ours or PEFT's).

        PEFT bookkeeping fields are ignored; PEFT features that change the maths and that
        hf_lora does not implement raise ``ValueError`` naming the field.
        """
        if not isinstance(data, Mapping):
            raise ValueError(f"{source}: expected a JSON object, got {type(data).__name__}.")
        peft_type = data.get("peft_type", "LORA")
        if peft_type != "LORA":
            raise ValueError(f"{source}: peft_type={peft_type!r} is not supported; hf_lora loads only 'LORA' adapters.")
        for name, default in _UNSUPPORTED_PEFT_FIELDS.items():
            value = data.get(name, default)
            if value not in (default, None, False, [], {}):
                raise ValueError(
                    f"{source}: {name}={value!r} is a PEFT feature hf_lora does not implement; "
                    f"only {default!r} can be loaded."
                )
        known = {f.name for f in fields(cls)}
        kwargs = {k: v for k, v in data.items() if k in known}
        if kwargs.get("target_modules") is None:
            raise ValueError(f"{source}: 'target_modules' is missing; it must list the adapted modules.")
        for key in ("rank_pattern", "alpha_pattern"):
            if kwargs.get(key) is None:
                kwargs.pop(key, None)
        try:
            return cls(**kwargs)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{source}: {exc}") from None


def _rebuild(cls: type[LoRAConfig], data: dict[str, Any]) -> LoRAConfig:
    return cls(**data)


def _lookup_pattern(patterns: Mapping[str, Any], module_name: str, default: Any) -> Any:
    for key, value in patterns.items():
        # The key is grouped so an alternation ("k_proj|o_proj") is matched as a whole, as in PEFT.
        if module_name == key or module_name.endswith("." + key) or re.fullmatch(rf"(.*\.)?(?:{key})", module_name):
            return value
    return default
