"""Built-in methods; importing this package registers each one by name."""

from . import align_lora, lora, mtl_lora, thanora  # noqa: F401
