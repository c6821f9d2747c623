"""Engine detection refuses accelerate settings that would silently lose the frozen base."""

from types import SimpleNamespace

import pytest

from mtpeft.errors import EngineError
from mtpeft.training.engines import engine_of


def _fsdp2(cpu_ram_efficient_loading: bool) -> SimpleNamespace:
    plugin = SimpleNamespace(cpu_ram_efficient_loading=cpu_ram_efficient_loading)
    return SimpleNamespace(distributed_type="DistributedType.FSDP", is_fsdp2=True,
                           state=SimpleNamespace(fsdp_plugin=plugin))


def test_fsdp2_with_cpu_ram_efficient_loading_is_refused() -> None:
    # MTModel.state_dict() holds only the adapter (so transformers.Trainer checkpoints stay small); accelerate's
    # RAM-efficient loading rebuilds every rank's model from it and would leave the base on the meta device.
    with pytest.raises(EngineError, match="fsdp_cpu_ram_efficient_loading"):
        engine_of(_fsdp2(True))


def test_fsdp2_without_it_is_the_fsdp_engine() -> None:
    assert engine_of(_fsdp2(False)).name == "FSDP"
