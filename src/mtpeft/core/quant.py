"""Quantized (bitsandbytes 4-/8-bit) base layers: detection, dequantization, and dense replacements for merging."""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from .targets import set_submodule


def is_quantized(layer: nn.Module) -> bool:
    """True for a bitsandbytes 4-/8-bit linear (its stored weight is not floating point)."""
    weight = getattr(layer, "weight", None)
    return weight is not None and not weight.dtype.is_floating_point


def dense_weight(layer: nn.Module) -> torch.Tensor:
    """The layer's weight as a dense floating-point tensor; bitsandbytes 4-bit and 8-bit weights are dequantized."""
    weight = layer.weight
    if weight.dtype.is_floating_point:
        return weight
    state = getattr(weight, "quant_state", None)
    if state is not None:  # Params4bit (NF4 / FP4)
        from bitsandbytes.functional import dequantize_4bit

        return dequantize_4bit(weight.data, state)
    scales = getattr(weight, "SCB", None)
    if scales is None:
        scales = getattr(getattr(layer, "state", None), "SCB", None)
    if scales is not None and weight.dtype == torch.int8:  # Int8Params: row-wise absmax scaling
        return weight.data.float() * (scales.float()[:, None] / 127.0)
    raise TypeError(f"cannot dequantize the weight of {type(layer).__name__} (dtype {weight.dtype})")


def dense_linear(quantized: nn.Module, weight: torch.Tensor) -> nn.Linear:
    """A plain ``nn.Linear`` with ``weight`` (already dequantized and merged) and the quantized layer's bias."""
    bias = getattr(quantized, "bias", None)
    dense = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device=weight.device,
                      dtype=weight.dtype)
    dense.weight.data.copy_(weight)
    if bias is not None:
        dense.bias.data.copy_(bias.data.to(weight.dtype))
    dense.requires_grad_(False)
    return dense


def dequantize_rest(model: nn.Module) -> None:
    """After a merge into dequantized weights, dequantize the linears no adapter touched as well and drop the
    markers that would make ``save_pretrained`` write (and ``from_pretrained`` expect) a bitsandbytes checkpoint:
    the merged model is a plain full-precision model, as vLLM and lm-eval load it."""
    for name, module in list(model.named_modules()):
        if name and is_quantized(module):
            set_submodule(model, name, dense_linear(module, dense_weight(module)))
    cfg = getattr(model, "config", None)
    if cfg is not None and hasattr(cfg, "quantization_config"):
        del cfg.quantization_config
    for attr in ("is_loaded_in_4bit", "is_loaded_in_8bit", "is_quantized"):
        if hasattr(model, attr):
            with contextlib.suppress(AttributeError):
                setattr(model, attr, False)
    for attr in ("hf_quantizer", "quantization_method"):
        if hasattr(model, attr):
            with contextlib.suppress(AttributeError):
                setattr(model, attr, None)
