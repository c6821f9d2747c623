"""mtpeft: multi-task low-rank adaptation for Hugging Face transformers models."""

__version__ = "0.1.0"

from .config import AdapterConfig, ConfigError, MethodSpec, available_methods, config_from_dict, register_method
from .methods.align_lora import AlignLoRAConfig
from .methods.lora import LoRAConfig
from .methods.mtl_lora import MTLLoRAConfig
from .methods.thanora import ThanoRAConfig
from .model import AdapterLoadError, MergeError, MTModel, get_mt_model

__all__ = [
    "AdapterConfig",
    "AdapterLoadError",
    "AlignLoRAConfig",
    "ConfigError",
    "LoRAConfig",
    "MTLLoRAConfig",
    "MTModel",
    "MergeError",
    "MethodSpec",
    "ThanoRAConfig",
    "__version__",
    "available_methods",
    "config_from_dict",
    "get_mt_model",
    "register_method",
]
