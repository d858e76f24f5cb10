"""`wrap` and `LoRAModelWrapper`: inject LoRA layers into a transformers model and drive them.

The wrapper is a plain ``nn.Module`` around the (mutated in place) base model, shaped so the
stock ``transformers.Trainer`` treats it correctly (see ``docs/trainer.md``):

* attribute reads fall through to the base model (``config``, ``generate``, ``loss_type``...);
* ``forward`` is defined per base class and carries the base forward's signature, so Trainer's
  label detection and column pruning see ``labels``, ``input_ids``...;
* ``state_dict`` / ``load_state_dict`` hold adapter tensors only, so Trainer's checkpoints are
  adapter-only and resume through its non-strict load;
* ``_hf_peft_config_loaded`` lets a bitsandbytes base through Trainer's "purely quantized"
  check; wrap re-does the check that flag skips (the quantizer must be trainable).
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from torch import nn

from .config import LoRAConfig
from .init import check_base_init, init_from_base
from .layers import LoRAEmbedding, LoRALayer, TrainedCopy
from .multi_adapter import MultiAdapterMixin
from .quantized import keep_cpu_4bit_weights_fixed
from .state import adapter_parameters, count_parameters, freeze_base, lora_layers
from .targets import match_modules_to_save, peft_target_modules, plan_targets
from .tokens import TrainableTokens, apply_trainable_tokens, plan_trainable_tokens, token_layers
from .trainer_compat import TrainerCompatMixin
from .tying import check_untied, untie_base_weights

_WRAPPER_CLASSES: dict[type, type] = {}


def _wrapper_class_for(base_class: type) -> type[LoRAModelWrapper]:
    """A ``LoRAModelWrapper`` subclass whose class-level ``forward`` mirrors ``base_class.forward``."""
    cached = _WRAPPER_CLASSES.get(base_class)
    if cached is not None:
        return cached

    def forward(self: LoRAModelWrapper, *args: Any, **kwargs: Any) -> Any:
        return self.base_model(*args, **kwargs)

    base_forward = getattr(base_class, "forward", None)
    try:
        forward.__signature__ = inspect.signature(base_forward)  # type: ignore[attr-defined]
    except (TypeError, ValueError):
        pass  # no introspectable signature: keep (*args, **kwargs)
    forward.__doc__ = getattr(base_forward, "__doc__", None)
    name = f"LoRA{base_class.__name__}"
    cls = type(name, (LoRAModelWrapper,), {"forward": forward, "__module__": __name__, "__qualname__": name})
    globals().setdefault(name, cls)  # importable by name, so pickling a wrapper works
    _WRAPPER_CLASSES[base_class] = cls
    return cls


def _check_quantized_base_trainable(model: nn.Module) -> None:
    # The _hf_peft_config_loaded flag makes Trainer skip this check, so it is done here.
    if not getattr(model, "is_quantized", False):
        return
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None and not getattr(quantizer, "is_trainable", False):
        method = getattr(model, "quantization_method", type(quantizer).__name__)
        raise ValueError(
            f"The base model is quantized with {method!s}, which does not support training; "
            "use bitsandbytes 4-bit or 8-bit (or another trainable quantization method)."
        )


def _replace_submodule(root: nn.Module, path: str, new: nn.Module) -> None:
    parent_path, _, child = path.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    setattr(parent, child, new)


class LoRAModelWrapper(TrainerCompatMixin, MultiAdapterMixin, nn.Module):
    """A transformers model with LoRA adapters injected. Build it with `wrap`.

    Attributes:
        base_model: The wrapped model; its targeted layers are now LoRA layers.
        lora_config: The `LoRAConfig` used.
    """

    # Read by transformers' Trainer: see the module docstring.
    _hf_peft_config_loaded = True
    _keys_to_ignore_on_save = None
    model_tags = ["hf-lora", "lora"]

    def __new__(cls, base_model: nn.Module | None = None, *args: Any, **kwargs: Any) -> LoRAModelWrapper:
        if cls is LoRAModelWrapper and isinstance(base_model, nn.Module):
            cls = _wrapper_class_for(type(base_model))
        return super().__new__(cls)

    def __init__(self, base_model: nn.Module, config: LoRAConfig | None = None) -> None:
        if isinstance(base_model, LoRAModelWrapper):
            raise ValueError("This model is already wrapped by hf_lora; wrap the original model once.")
        if any(isinstance(m, (LoRALayer, TrainedCopy)) for m in base_model.modules()):
            raise ValueError("This model already contains hf_lora LoRA layers; wrap the original model once.")
        if _is_peft_injected(base_model):
            raise ValueError("This model already contains PEFT adapters; unload them before wrapping with hf_lora.")
        config = config if config is not None else LoRAConfig()
        if not isinstance(config, LoRAConfig):
            raise ValueError(f"config must be a LoRAConfig, got {type(config).__name__}.")
        _check_quantized_base_trainable(base_model)
        # Plan everything first: a bad config raises before the model is touched.
        plan = plan_targets(base_model, config)
        save_paths = match_modules_to_save(base_model, config.modules_to_save)
        token_plan = plan_trainable_tokens(base_model, config.trainable_token_indices)
        # New-token rows combine with a plain LoRA embedding adapter, not with DoRA or a full copy.
        combinable = {t.path for t in plan if t.lora_class is LoRAEmbedding}
        clash = sorted({p for p, _, _ in token_plan} & ({t.path for t in plan} - combinable | set(save_paths)))
        if clash:
            raise ValueError(
                f"Modules {clash} get trainable_token_indices and are also DoRA/non-embedding LoRA targets or in "
                "modules_to_save; choose one."
            )
        overlap = sorted(set(save_paths) & {t.path for t in plan})
        if overlap:
            raise ValueError(f"Modules {overlap} are both LoRA targets and in modules_to_save; choose one.")
        # A saved module is trained in full: an adapter inside it (or one around it) would be copied with it.
        nested = next(((s, t.path) for s in save_paths for t in plan
                       if t.path.startswith(s + ".") or s.startswith(t.path + ".")), None)
        if nested:
            raise ValueError(
                f"modules_to_save module {nested[0]!r} and LoRA target {nested[1]!r} are nested; a module "
                "trained in full needs no adapter inside it: narrow target_modules or modules_to_save."
            )
        check_base_init([(t.path, t.lora_class) for t in plan], config.init_lora_weights, base_model)
        super().__init__()
        keep_cpu_4bit_weights_fixed(base_model)  # bnb would otherwise alter the frozen 4-bit base
        self.lora_config = config
        self.peft_target_modules = peft_target_modules(base_model, [t.path for t in plan])
        for target in plan:
            layer = target.lora_class(
                target.module, r=target.r, scaling=target.scaling,
                dropout=config.lora_dropout, init=config.init_lora_weights,
            )
            layer._hf_lora_path = target.path
            init_from_base(layer, config.init_lora_weights)  # PiSSA / OLoRA; no-op otherwise
            layer.train(target.module.training)  # a fresh layer must not turn dropout on in an eval model
            _replace_submodule(base_model, target.path, layer)
        for path in save_paths:
            _replace_submodule(base_model, path, TrainedCopy(base_model.get_submodule(path)))
        apply_trainable_tokens(base_model, token_plan)  # new-token rows (tokens.py)
        self.base_model = base_model
        freeze_base(base_model, config.bias)

    # --- delegation (what Trainer and users read from "the model") ----------------------------

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_model":
                raise
            return getattr(self.base_model, name)

    def get_base_model(self) -> nn.Module:
        """The wrapped transformers model (PEFT's name for ``base_model``)."""
        return self.base_model

    # --- adapter state ------------------------------------------------------------------------

    def adapter_parameters(self) -> dict[str, nn.Parameter]:
        """Adapter parameters keyed by path in ``base_model`` (the one definition of adapter state)."""
        return adapter_parameters(self.base_model, self.lora_config.bias)

    def trainable_parameters(self) -> tuple[int, int]:
        """``(trainable, total)`` parameter counts."""
        return count_parameters(self)

    def print_trainable_parameters(self) -> None:
        """Print ``trainable params: N || all params: M || trainable%: P``."""
        trainable, total = self.trainable_parameters()
        print(f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}")

    # --- merge / disable ------------------------------------------------------------------------

    def _lora_layers(self) -> list[LoRALayer]:
        self._check_not_unloaded()
        # Trainable token rows merge, unmerge and disable like LoRA layers (same methods and flags).
        # Token layers first: one wrapping a LoRA embedding merges it before its rows, unmerges it after.
        return token_layers(self.base_model) + [layer for _, layer in lora_layers(self.base_model)]  # type: ignore[operator]

    def merge(self, keep_original: bool = True) -> None:
        """Fold every adapter into its base weight (fp32 maths). Idempotent; `unmerge` reverses it.

        Args:
            keep_original: Keep a copy of each merged base weight so `unmerge` is bit-exact
                (one extra copy of the adapted weights). ``False`` saves that memory and
                unmerges by subtraction, exact up to rounding.

        Raises:
            ValueError: an adapted weight is tied to another module, or a merged weight would
                hold NaN/inf. The model is then left unmerged, as it was.
        """
        layers = self._lora_layers()
        check_untied(self.base_model)  # a tied weight would carry the delta into another module
        merged_now: list[LoRALayer] = []
        try:
            for layer in layers:
                if not layer.merged:
                    layer.merge(keep_original=keep_original)
                    merged_now.append(layer)
        except BaseException:
            for layer in reversed(merged_now):  # all or nothing: no half-merged model
                layer.unmerge()
            raise

    def unmerge(self) -> None:
        """Take every adapter back out of its base weight. Idempotent."""
        for layer in self._lora_layers():
            layer.unmerge()

    @contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Run the base model: adapters skipped, ``modules_to_save`` originals used."""
        layers = self._lora_layers()
        copies = [m for m in self.base_model.modules() if isinstance(m, TrainedCopy)]
        was_merged = [layer.merged for layer in layers]
        for layer in layers:
            layer.unmerge()
            layer.disabled = True
        for copy in copies:
            copy.disabled = True
        try:
            yield
        finally:
            for layer, merged in zip(layers, was_merged):
                layer.disabled = False
                if merged:
                    layer.merge()
            for copy in copies:
                copy.disabled = False

    def merge_and_unload(self) -> nn.Module:
        """Merge, then return the plain base model with its original module classes.

        The wrapper is unusable afterwards. On a bitsandbytes base the merged weights are
        requantized (a warning says so); `hf-lora merge` merges into a 16-bit copy instead.
        """
        self._check_not_unloaded()
        untie_base_weights(self.base_model)  # the other user of a tied weight keeps the original
        self.merge(keep_original=False)
        return self._restore_base()

    def _restore_base(self) -> nn.Module:
        """Put the base layers back in place of the LoRA layers (no merge) and return the base."""
        base = self.base_model
        for path, module in reversed(list(base.named_modules())):  # innermost wrappers first
            if isinstance(module, LoRALayer):
                _replace_submodule(base, path, module.base_layer)
            elif isinstance(module, TrainableTokens):
                _replace_submodule(base, path, module.base_layer)
            elif isinstance(module, TrainedCopy):
                _replace_submodule(base, path, module.trained_module if module.trained_module is not None else module.original_module)
        self._unloaded = True
        return base

    def _check_not_unloaded(self) -> None:
        if self.__dict__.get("_unloaded"):
            raise RuntimeError("This wrapper was unloaded (merge_and_unload); wrap the model again to add adapters.")

    # --- files ------------------------------------------------------------------------------------

    def save_pretrained(
        self, save_directory: str, *, is_main_process: bool = True,
        path_initial_model_for_weight_conversion: str | None = None, **card_fields: Any,
    ) -> None:
        """Write ``adapter_config.json``, ``adapter_model.safetensors`` and a ``README.md`` card (PEFT layout).

        ``path_initial_model_for_weight_conversion`` (PEFT's name): the folder of a PiSSA/OLoRA
        adapter saved right after `wrap`; the adapter is then saved as a plain rank-2r LoRA that
        applies to the ORIGINAL base (`hf_lora.init.save_as_lora`).

        With several adapters loaded (`load_adapter`), ``"default"`` goes in ``save_directory`` and
        each other adapter in ``save_directory/<name>`` (`save_adapters`).
        """
        from .checkpoint import save_adapter

        if not is_main_process:
            return
        if path_initial_model_for_weight_conversion is not None:
            from .init import save_as_lora

            save_as_lora(self, save_directory, initial=path_initial_model_for_weight_conversion)
            return
        if len(self.adapters) > 1 or self.active_adapter != "default":
            self.save_adapters(save_directory, **card_fields)
        else:
            save_adapter(self, save_directory, **card_fields)

    @classmethod
    def from_pretrained(
        cls,
        base_model: nn.Module,
        model_id: str,
        *,
        is_trainable: bool = False,
        revision: str | None = None,
        token: str | None = None,
        subfolder: str | None = None,
        strict_base: bool = False,
    ) -> LoRAModelWrapper:
        """Wrap ``base_model`` with the adapter in folder or Hub repo ``model_id`` (ours or PEFT's).

        ``is_trainable=False`` (PEFT's default) freezes the adapter for inference. When the
        adapter was saved on a different base (see ``hf_lora.fingerprint``), a
        ``BaseMismatchWarning`` names what differs; ``strict_base=True`` raises instead.
        """
        from .checkpoint import load_pretrained

        return load_pretrained(base_model, model_id, is_trainable=is_trainable, revision=revision, token=token,
                               subfolder=subfolder, strict_base=strict_base)

    def push_to_hub(self, repo_id: str, **kwargs: Any) -> str:
        """Upload the adapter files and model card to the Hub; see `hf_lora.hub.push_adapter`."""
        from .hub import push_adapter

        return push_adapter(self, repo_id, **kwargs)



def _is_peft_injected(model: nn.Module) -> bool:
    return any(type(m).__module__.startswith("peft.tuners") for m in model.modules())


def wrap(model: nn.Module, config: LoRAConfig | None = None) -> LoRAModelWrapper:
    """Inject LoRA adapters into ``model`` and return the wrapper Trainer can train.

    Args:
        model: A transformers model (or any ``nn.Module`` with supported layers). It is
            modified in place: targeted layers become LoRA layers, the rest is frozen.
        config: What to adapt; ``LoRAConfig()`` (r=8, alpha=16, attention + MLP) by default.

    A quantized (bitsandbytes) base also gets its 1-D parameters (norms, biases) upcast to fp32
    (``hf_lora.prepare_for_kbit_training(model, input_grads=False)``; see ``docs/qlora.md``).
    """
    wrapper = LoRAModelWrapper(model, config)
    if getattr(model, "is_quantized", False):
        from .kbit import prepare_for_kbit_training

        prepare_for_kbit_training(model, input_grads=False)
    return wrapper
