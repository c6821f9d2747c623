"""Test aid: run the ``mtpeft`` CLI under accelerate's FSDP2 or DeepSpeed engine in CPU processes (gloo).

accelerate turns FSDP and DeepSpeed on only for accelerator devices, although torch's FSDP2 runs on CPU with
gloo and DeepSpeed has a CPU accelerator of its own. This launcher lifts that one gate after accelerate has set
up its CPU process group, so that CPU tests exercise accelerate's own engine preparation (``fully_shard`` of
the decoder layers and the root; ``deepspeed.initialize`` with ZeRO) and mtpeft's state handling around it.
The ``FSDP_*`` / ``ACCELERATE_DEEPSPEED_*`` environment variables configure the plugin as ``accelerate launch``
sets them from a config file.
"""

from __future__ import annotations

import os
import sys

from accelerate.state import AcceleratorState
from accelerate.utils import DeepSpeedPlugin, DistributedType, FullyShardedDataParallelPlugin

_original_init = AcceleratorState.__init__


def _init_with_engine_on_cpu(self, *args, **kwargs) -> None:
    _original_init(self, *args, **kwargs)
    if self.distributed_type != DistributedType.MULTI_CPU:
        return
    if os.environ.get("ACCELERATE_USE_FSDP") == "true":
        self.fsdp_plugin = FullyShardedDataParallelPlugin()
        self.distributed_type = DistributedType.FSDP
    elif os.environ.get("ACCELERATE_USE_DEEPSPEED") == "true":
        plugin = DeepSpeedPlugin()
        plugin.set_mixed_precision(self._mixed_precision)
        plugin.select(_from_accelerator_state=True)
        self.deepspeed_plugins = plugin
        self.distributed_type = DistributedType.DEEPSPEED


AcceleratorState.__init__ = _init_with_engine_on_cpu

if __name__ == "__main__":
    from mtpeft.cli import main

    sys.exit(main(sys.argv[1:]))
