"""Files: adapter save/load, atomic writes, PEFT export and approximate export of input-routed adapters."""
