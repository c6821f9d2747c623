"""mtpeft: multi-task low-rank adaptation for Hugging Face transformers models."""

__version__ = "0.1.0"

from .config import AdapterConfig, ConfigError, MethodSpec, available_methods, config_from_dict, register_method
from .methods.align_lora import AlignLoRAConfig
from .methods.hydralora import HydraLoRAConfig
from .methods.lora import LoRAConfig
from .methods.moe_lora import MoELoRAConfig
from .methods.mtl_lora import MTLLoRAConfig
from .methods.mtlora import MtLoRAConfig
from .methods.ta_lora import TALoRAConfig
from .methods.thanora import ThanoRAConfig
from .model import AdapterLoadError, MergeError, MTModel, get_mt_model

__all__ = [
    "AdapterConfig",
    "AdapterLoadError",
    "AlignLoRAConfig",
    "ConfigError",
    "HydraLoRAConfig",
    "LoRAConfig",
    "MTLLoRAConfig",
    "MTModel",
    "MergeError",
    "MethodSpec",
    "MoELoRAConfig",
    "MtLoRAConfig",
    "TALoRAConfig",
    "ThanoRAConfig",
    "__version__",
    "available_methods",
    "config_from_dict",
    "get_mt_model",
    "register_method",
]
