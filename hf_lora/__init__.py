"""hf_lora: LoRA adapters for Hugging Face transformers models and the stock Trainer.

    from hf_lora import LoRAConfig, wrap
    model = wrap(base_model, LoRAConfig(r=8, lora_alpha=16, target_modules=["attention", "mlp"]))
"""

from .config import LoRAConfig
from .model import LoRAModelWrapper, wrap

__all__ = ["LoRAConfig", "LoRAModelWrapper", "wrap"]
__version__ = "0.1.0"
