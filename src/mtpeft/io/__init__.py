"""Files: atomic writes, PEFT export and approximate export of input-routed adapters."""
