"""``data.packing`` in the trainer: the check that a model keeps attention inside packed examples, and the token
count of a padded or packed batch.

Packed rows rely on the base model to honour ``position_ids`` that restart at 0 as example boundaries
(:mod:`mtpeft.core.packed`): transformers' causal LMs do for every attention implementation, but an encoder's
bidirectional mask or a model's own code may not, and then every example would silently read the others. So
before training starts the model runs one tiny packed batch: two rows whose second example is the same and whose
first examples differ; the second example's logits must not change.
"""

from __future__ import annotations

from typing import Any

import torch

from ..data.packing import real_token_count
from ..errors import ConfigError

__all__ = ["check_packed_attention", "checked_model", "real_token_count"]

#: Lengths of the probe's two examples.
PROBE_LENGTHS = (6, 5)
#: The second example's logits may differ by this much relative to their size (1 + max |logit|) between the rows:
#: kernels may round differently, while attention across the examples changes them by orders of magnitude more.
PROBE_TOLERANCE = 1e-3


def checked_model(model: Any, data: Any) -> Any:
    """``model``, after :func:`check_packed_attention` when ``data.packing`` (a run config's data section) is on."""
    if getattr(data, "packing", False):
        check_packed_attention(model)
    return model


@torch.no_grad()
def check_packed_attention(model: Any) -> None:
    """Raise a ConfigError naming ``data.packing`` unless ``model`` (an MTModel) keeps each example of a packed row
    to itself. The probe's tokens come from a fixed generator: the global random state is left as it was."""
    first, second = PROBE_LENGTHS
    vocab = int(model.get_input_embeddings().weight.shape[0])
    gen = torch.Generator().manual_seed(0)
    head = torch.randint(0, vocab, (first,), generator=gen)
    heads = torch.stack([head, (head + 1 + torch.arange(first)) % vocab])  # two different first examples
    tail = torch.randint(0, vocab, (1, second), generator=gen).expand(2, second)
    ids = torch.cat([heads, tail], 1).to(model.device)
    segments = torch.tensor([0] * first + [1] * second, device=ids.device).expand(2, -1)
    name = type(getattr(model, "base_model", model)).__name__
    was_training = model.training
    model.eval()
    try:
        out = model(input_ids=ids, segment_ids=segments, task_ids=torch.zeros_like(ids) if model.tasks else None)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"data.packing: {name} cannot run packed rows ({exc}); set data.packing: false") from exc
    finally:
        model.train(was_training)
    logits = getattr(out, "logits", None)
    if logits is None:
        raise ConfigError(f"data.packing: {name} returned no logits to check packed attention with; set "
                          f"data.packing: false")
    tail_logits = logits[:, first:].double()
    change = float((tail_logits[0] - tail_logits[1]).abs().max())
    if not change <= PROBE_TOLERANCE * (1 + float(tail_logits.abs().max())):
        raise ConfigError(f"data.packing: {name}'s attention crosses the examples of a packed row (changing one "
                          f"example changed the next one's logits by {change:.3g}): its attention does not honour "
                          f"restarting position_ids (an encoder, or custom model code); set data.packing: false")
