"""The next token of one sequence from its logits: greedy, temperature and nucleus (top-p) sampling.

Greedy is ``argmax`` (what ``generate(do_sample=False)`` does). Sampling divides the logits by the
temperature, keeps the smallest set of most likely tokens whose probability reaches ``top_p``
(Holtzman et al. 2020, "The Curious Case of Neural Text Degeneration"; the most likely token is
always kept) and draws from the renormalised distribution with the request's own generator, so a
request's ``seed`` fixes its answer whatever else is in the batch.
"""

from __future__ import annotations

import torch

from aiflow_fl.serving.acceptance import probs_from_logits


def nucleus_probs(logits: torch.Tensor, temperature: float, top_p: float = 1.0) -> torch.Tensor:
    """(V,) probabilities after temperature (the chain's own :func:`probs_from_logits`) and top-p truncation (sums to 1)."""
    probs = probs_from_logits(logits, temperature)
    if top_p >= 1.0:
        return probs
    ordered, order = torch.sort(probs, descending=True)
    before = torch.cumsum(ordered, dim=-1) - ordered  # mass of the strictly more likely tokens
    ordered = torch.where(before < top_p, ordered, torch.zeros_like(ordered))
    kept = torch.zeros_like(probs).scatter_(-1, order, ordered)
    return kept / kept.sum()


def next_token(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None) -> int:
    """One token from (V,) logits: argmax when ``temperature`` is 0, else a nucleus sample."""
    if temperature <= 0:
        return int(torch.argmax(logits))
    return int(torch.multinomial(nucleus_probs(logits, temperature, top_p), 1, generator=generator))
