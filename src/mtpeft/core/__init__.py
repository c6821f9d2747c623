"""The core every method builds on: task context, the adapter layer base, target matching, quantization, distributed helpers."""
