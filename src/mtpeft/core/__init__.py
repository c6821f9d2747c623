"""The core every method builds on: task context, the adapter layer base, target matching, quantization and
distributed helpers."""
