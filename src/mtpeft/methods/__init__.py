"""Built-in methods; importing this package registers each one by name."""

from . import align_lora, hydralora, lora, moe_lora, mtl_lora, mtlora, ta_lora, thanora  # noqa: F401
