"""mtpeft: multi-task low-rank adaptation for Hugging Face transformers models."""

__version__ = "0.1.0"

from . import methods  # noqa: F401  (importing the package registers the built-in methods)
from .config import AdapterConfig
from .errors import AdapterLoadError, ConfigError, MergeError, MtpeftError
from .methods.align_lora import AlignLoRAConfig
from .methods.hydralora import HydraLoRAConfig
from .methods.lora import LoRAConfig
from .methods.moe_lora import MoELoRAConfig
from .methods.mtl_lora import MTLLoRAConfig
from .methods.mtlora import MtLoRAConfig
from .methods.ta_lora import TALoRAConfig
from .methods.thanora import ThanoRAConfig
from .model import MTModel, get_mt_model
from .registry import MethodSpec, available_methods, config_from_dict, register_method

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
    "MtpeftError",
    "MtLoRAConfig",
    "TALoRAConfig",
    "ThanoRAConfig",
    "__version__",
    "available_methods",
    "config_from_dict",
    "get_mt_model",
    "register_method",
]
