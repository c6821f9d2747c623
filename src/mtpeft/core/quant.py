"""Quantized (bitsandbytes 4-/8-bit) base layers: detection, dequantization, and dense replacements for merging."""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import nn

from .targets import set_submodule


def is_quantized(layer: nn.Module) -> bool:
    """True for a bitsandbytes 4-/8-bit linear: its stored weight is not floating point, or it is 4-bit codes
    stored in a floating-point dtype (``bnb_4bit_quant_storage``, as FSDP wants)."""
    weight = getattr(layer, "weight", None)
    if weight is None:
        return False
    return not weight.dtype.is_floating_point or getattr(weight, "quant_state", None) is not None


def dense_weight(layer: nn.Module) -> torch.Tensor:
    """The layer's weight as a dense floating-point tensor; bitsandbytes 4-bit and 8-bit weights are dequantized
    (a 4-bit weight in either layout: the standard one or bitsandbytes' CPU inference layout)."""
    weight = layer.weight
    state = getattr(weight, "quant_state", None)
    if state is None and weight.dtype.is_floating_point:
        return weight
    if state is not None:  # Params4bit (NF4 / FP4)
        from bitsandbytes.functional import dequantize_4bit

        data = weight.data
        if _in_cpu_inference_layout(state):
            data, state = standard_4bit_layout(data, state)
        return dequantize_4bit(data, state)
    scales = getattr(weight, "SCB", None)
    if scales is None:
        scales = getattr(getattr(layer, "state", None), "SCB", None)
    if scales is not None and weight.dtype == torch.int8:  # Int8Params: row-wise absmax scaling
        return weight.data.float() * (scales.float()[:, None] / 127.0)
    raise TypeError(f"cannot dequantize the weight of {type(layer).__name__} (dtype {weight.dtype})")


# bitsandbytes (0.50: ``_convert_weight_packed_for_cpu``) repacks a 4-bit weight for its AVX-512-BF16 CPU inference
# kernel in blocks of 32 output rows; that layout is undone here byte for byte (its own inverse loses the scales'
# order without double quantization).
_CPU_LAYOUT_ROWS = 32


def _in_cpu_inference_layout(state: Any) -> bool:
    return bool(getattr(state, "packing_format_for_cpu", False))


def standard_4bit_layout(data: torch.Tensor, state: Any) -> tuple[torch.Tensor, Any]:
    """The bytes and a new ``QuantState`` of a 4-bit weight in bitsandbytes' standard layout, from the same weight
    in its CPU inference layout (``quant_state.packing_format_for_cpu``); ``data`` and ``state`` are left as they are.

    That layout holds the weight as [out, in/2] bytes, each group of 32 output rows interleaved, and the block
    scales (absmax) as a transposed bf16 matrix with double quantization undone. The result keeps those bf16
    scales (in fp32, not nested): it is exactly the weight the inference kernel computed with.
    """
    from bitsandbytes.functional import QuantState

    rows, cols = state.shape
    packed = data.contiguous().view(torch.uint8).reshape(-1, _CPU_LAYOUT_ROWS)
    # 32 bytes hold the 64 codes of 32 rows x 2 columns: the first 32 codes in the low nibbles, the rest in the high
    codes = torch.cat([packed & 0xF, packed >> 4], dim=-1)
    codes = codes.reshape(rows // _CPU_LAYOUT_ROWS, cols // 2, _CPU_LAYOUT_ROWS, 2).transpose(1, 2).reshape(-1)
    standard = ((codes[0::2] << 4) | codes[1::2]).reshape(state.original_qshape)
    storage = getattr(state, "original_storage_type", None)
    if storage is not None:
        standard = standard.view(storage)
    absmax = state.absmax.T.reshape(-1).float()  # [in/blocksize, out] -> row-major [out, in/blocksize]
    restored = QuantState(absmax=absmax, shape=state.shape, code=state.code, blocksize=state.blocksize,
                          quant_type=state.quant_type, dtype=state.original_dtype)
    restored.packing_format_for_cpu = False  # as bitsandbytes marks a state it converted back itself
    return standard, restored


def keep_standard_4bit_layout(model: nn.Module) -> None:
    """Keep every bitsandbytes 4-bit linear of ``model`` in the standard layout: turn off the CPU inference repacking
    and undo it where a forward has already done it.

    On CPUs with AVX-512-BF16, ``Linear4bit.forward`` in eval mode on an input without grad repacks the weight in
    place for a bf16 kernel (bitsandbytes 0.50). That kernel has no autograd, so training after any evaluation
    gives the adapters no gradient; it computes in bf16 whatever the compute dtype; and merging would dequantize
    the repacked bytes. In the standard layout evaluation, training and merging use one weight on every CPU.
    """
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
        weight = getattr(module, "weight", None)
        state = getattr(weight, "quant_state", None)
        if state is not None and _in_cpu_inference_layout(state):
            weight.data, weight.quant_state = standard_4bit_layout(weight.data, state)
            if getattr(module, "quant_state", None) is not None:
                module.quant_state = weight.quant_state


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
