"""The core every method builds on: the task context, the adapter layer base classes and their declared
capabilities, the shared low-rank ops, routing (with its public observer hook), spectral regularizers, block
wrapping, target matching, the chunked loss, packed rows (segments), quantization and distributed helpers."""
