"""hf_lora: LoRA adapters for Hugging Face transformers models and the stock Trainer.

    from hf_lora import LoRAConfig, wrap
    model = wrap(base_model, LoRAConfig(r=8, lora_alpha=16, target_modules=["attention", "mlp"]))
"""

from .config import LoRAConfig
from .kbit import prepare_for_kbit_training
from .model import LoRAModelWrapper, wrap
from .optimizers import create_loraplus_optimizer

__all__ = ["LoRACallback", "ForgettingCallback", "SkipIncompleteCheckpoints", "prepare_for_kbit_training", "create_loraplus_optimizer", "LoRAConfig", "LoRAModelWrapper", "wrap"]
__version__ = "0.1.0"


def __getattr__(name: str) -> object:
    # LoRACallback imports transformers' Trainer stack (seconds); load it only when asked for.
    if name == "LoRACallback":
        from .callbacks import LoRACallback

        return LoRACallback
    if name == "ForgettingCallback":
        from .forgetting import ForgettingCallback

        return ForgettingCallback
    if name == "SkipIncompleteCheckpoints":
        from .resume import SkipIncompleteCheckpoints

        return SkipIncompleteCheckpoints
    raise AttributeError(f"module 'hf_lora' has no attribute {name!r}")
