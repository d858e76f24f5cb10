"""hf_lora: LoRA adapters for Hugging Face transformers models and the stock Trainer.

    from hf_lora import LoRAConfig, wrap
    model = wrap(base_model, LoRAConfig(r=8, lora_alpha=16, target_modules=["attention", "mlp"]))
"""

from .config import LoRAConfig
from .model import LoRAModelWrapper, wrap
from .optimizers import create_loraplus_optimizer

__all__ = ["create_loraplus_optimizer", "LoRAConfig", "LoRAModelWrapper", "wrap"]
__version__ = "0.1.0"
