"""Evaluation metrics on QA instances (TOFU conventions).

Teacher-forced metrics need one forward pass: with labels on the answer positions, greedy decoding from
the prompt reproduces the answer exactly iff the argmax of every answer position equals its label, so
:func:`exact_match` is exact without generating.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from ._batching import chunks, eval_mode, model_device, shifted, to_device
from .data import encode

__all__ = ["exact_match", "token_accuracy"]


@torch.no_grad()
def _argmax_hits(model, tokenizer, examples: Sequence[Any], batch_size: int = 128,
                 answer_field: str = "answer") -> tuple[np.ndarray, np.ndarray]:
    """Per instance: number of answer tokens whose argmax equals the label, and the number of answer tokens."""
    batch = encode(tokenizer, examples, answer_field=answer_field)
    device = model_device(model)
    hits, totals = [], []
    with eval_mode(model):
        for _, part in chunks(batch, batch_size):
            part = to_device(part, device)
            logits = model(input_ids=part["input_ids"], attention_mask=part["attention_mask"]).logits
            lg, lab, mask = shifted(logits, part["labels"])
            ok = (lg.argmax(-1) == lab) & mask
            hits.append(ok.sum(1).cpu())
            totals.append(mask.sum(1).cpu())
    return torch.cat(hits).numpy(), torch.cat(totals).numpy()


def exact_match(model, tokenizer, examples: Sequence[Any], batch_size: int = 128) -> np.ndarray:
    """``[instance]`` bool: greedy decoding from the prompt reproduces the whole answer (and its EOS)."""
    hits, totals = _argmax_hits(model, tokenizer, examples, batch_size)
    return hits == totals


def token_accuracy(model, tokenizer, examples: Sequence[Any], batch_size: int = 128) -> np.ndarray:
    """``[instance]`` float: share of answer tokens predicted by the argmax under teacher forcing
    (the "exact memorisation" of the unlearning literature)."""
    hits, totals = _argmax_hits(model, tokenizer, examples, batch_size)
    return hits / np.maximum(totals, 1)
