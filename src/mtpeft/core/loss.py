"""The causal-LM loss from labelled positions only: a chunked linear cross-entropy whose gradients are
computed in the forward pass, so no (tokens, vocab) logits tensor is ever kept."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

# On CPU a block's (rows, vocab) fp32 logits stay under 16 MiB where the vocabulary allows: glibc malloc serves
# blocks of up to 32 MiB from its heap and reuses them, while each larger one is a fresh mmap whose pages fault
# and are zeroed on first touch (measured: 1016 x 8192 logits in one block made a tiny-Llama training step ~6%
# slower than blocks of 512 rows). At least 64 rows per block, so that each pass over the head weight is shared.
_CPU_BLOCK_ELEMENTS = 1 << 22
_CPU_MIN_BLOCK_ROWS = 64


class _LinearCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of ``hidden @ weight.T + bias`` whose gradients are computed in the forward pass.

    The loss is the last op of the graph, so its gradient is known up to the scalar ``grad_output`` while the
    logits are at hand: each chunk's logits become softmax minus one-hot in place and are multiplied back into
    gradients at once. No (tokens, vocab) tensor is kept for backward or recomputed; the log-softmax backward
    kernel and the zero-filled nll gradient of the plain path are skipped.
    """

    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                targets: torch.Tensor, chunk: int, grad_enabled: bool) -> torch.Tensor:
        need_h, need_w, need_b = (grad_enabled and n for n in ctx.needs_input_grad[:3])
        need_any = need_h or need_w or need_b
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros_like(weight, dtype=torch.float32) if need_w else None
        grad_b = torch.zeros_like(bias, dtype=torch.float32) if need_b else None
        if hidden.device.type == "cpu":  # see _CPU_BLOCK_ELEMENTS
            chunk = min(chunk, max(_CPU_MIN_BLOCK_ROWS, _CPU_BLOCK_ELEMENTS // weight.shape[0]))
        for start in range(0, hidden.shape[0], chunk):
            h, y = hidden[start:start + chunk], targets[start:start + chunk]
            log_probs = torch.log_softmax(nn.functional.linear(h, weight, bias).float(), dim=-1)
            total -= log_probs.gather(1, y[:, None]).sum()
            if not need_any:
                continue
            dlogits = log_probs.exp_()  # softmax - onehot: d(summed loss) / d logits
            del log_probs
            dlogits[torch.arange(y.shape[0], device=y.device), y] -= 1
            dlogits = dlogits.to(hidden.dtype)
            if need_h:
                torch.mm(dlogits, weight, out=grad_h[start:start + chunk])
            if need_w:
                grad_w += (dlogits.t() @ h).float()
            if need_b:
                grad_b += dlogits.float().sum(0)
            del dlogits
        ctx.save_for_backward(grad_h, grad_w, grad_b)
        ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        return total

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad_output: torch.Tensor):
        grad_h, grad_w, grad_b = (None if g is None else (g * grad_output).to(dtype)
                                  for g, dtype in zip(ctx.saved_tensors, ctx.dtypes))
        return grad_h, grad_w, grad_b, None, None, None


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                         targets: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    """``F.cross_entropy(F.linear(hidden, weight, bias).float(), targets, reduction="sum")`` (fp32) in chunks of
    ``chunk`` rows, with its gradients computed in the forward pass (:class:`_LinearCrossEntropy`)."""
    return _LinearCrossEntropy.apply(hidden, weight, bias, targets, max(int(chunk), 1), torch.is_grad_enabled())


def can_chunk_loss(base_model: nn.Module) -> bool:
    """Whether :func:`chunked_causal_lm_loss` computes ``base_model``'s own loss: a causal LM with a decoder and
    an output head, without logit soft-capping or scaling."""
    cfg = getattr(base_model, "config", None)
    return (type(base_model).__name__.endswith("ForCausalLM") and hasattr(base_model, "get_decoder")
            and base_model.get_output_embeddings() is not None
            and getattr(cfg, "final_logit_softcapping", None) is None
            and getattr(cfg, "logit_scale", None) is None)


def chunked_causal_lm_loss(base_model: nn.Module, input_ids: torch.Tensor | None,
                           attention_mask: torch.Tensor | None, labels: torch.Tensor, chunk: int,
                           **kwargs: Any) -> Any:
    """The causal-LM loss computed from labelled positions only, ``chunk`` rows at a time.

    Prompt tokens need no logits in supervised fine-tuning, and the full (batch, seq, vocab) logits
    tensor is what dominates memory: :func:`linear_cross_entropy` computes each chunk's logits, loss and
    gradient at once and keeps none of them. Equals the model's mean token cross-entropy (the summed one
    over ``num_items_in_batch`` when given); ``out.logits`` is None.
    """
    from transformers.modeling_outputs import CausalLMOutputWithPast

    num_items = kwargs.pop("num_items_in_batch", None)
    decoder_out = base_model.get_decoder()(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
    hidden = decoder_out[0][:, :-1]
    targets = labels[:, 1:].to(hidden.device)
    keep = targets != -100
    hidden, targets = hidden[keep], targets[keep]
    head = base_model.get_output_embeddings()
    if isinstance(head, nn.Linear) and head.weight.dtype.is_floating_point:
        total = linear_cross_entropy(hidden, head.weight, head.bias, targets, chunk)
    else:  # a head that is not a plain dense linear (a quantized one): its own forward, in one block
        total = nn.functional.cross_entropy(head(hidden).float(), targets, reduction="sum")
    # ``num_items_in_batch`` (the transformers convention) replaces the local label count, e.g. by the
    # global count over the data-parallel processes divided by their number.
    denominator = num_items if num_items is not None else max(int(keep.sum()), 1)
    if torch.is_tensor(denominator):
        denominator = denominator.to(total.device)
    return CausalLMOutputWithPast(loss=total / denominator, logits=None)
