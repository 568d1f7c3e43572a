"""Quality of a member on held-out text: perplexity and next-token top-1 accuracy."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel


def evaluate_lm(model: PreTrainedModel, batches: Iterable[torch.Tensor]) -> dict[str, float]:
    """``{"ppl", "top1_acc", "tokens"}`` over every next-token prediction in ``batches`` ((B, T) ids)."""
    total_nll, correct, count = 0.0, 0, 0
    model.eval()
    with torch.inference_mode():
        for ids in batches:
            logits = model(input_ids=ids, use_cache=False).logits[:, :-1].float()
            target = ids[:, 1:]
            total_nll += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="sum"))
            correct += int((logits.argmax(-1) == target).sum())
            count += target.numel()
    return {"ppl": math.exp(total_nll / count), "top1_acc": correct / count, "tokens": count}
