"""Scoring the collaboration without a judge: multiple-choice cloze by log-likelihood (pure math).

An item is a passage prefix with ``O`` candidate continuations of equal token length (the true one
and distractors from other passages of the same domain). A member's score of option o is
Σ_t log p(o_t | prefix, o_<t) (equal lengths, so sum and mean rank alike) and it picks the argmax.
Inputs here are tensors of per-token log-probabilities, ``(M, I, O, T)``: members × items × options
× tokens (:func:`aiflow_fl.collab.agents.score_continuations` gives one member's ``(O, T)`` per item).

* **router's single choice** / **protocol with k agents** — the familial synthesis of the protocol
  (token-level fusion, :mod:`aiflow_fl.collab.fusion`): per item the top-k routed specialists'
  distributions mixed token by token with the router weights, Σ_t log Σ_i w_i p_i(o_t | ·); k = 1 is
  the router's single choice.
* **average ensemble** — the same mixture with uniform weights over *all* members, no routing
  (the baseline that isolates routing from plain ensembling).
* **majority vote** — every member's own pick; ties go to the option the average ensemble ranks
  higher.
* **revision** (broadcast) — a device that receives the synthesis combines its own posterior over the
  options with the synthesis's, as two independent opinions: argmax_o [log softmax(s_own)_o +
  log softmax(s_synth)_o] (product of experts, no free weight). The gain of a device is its accuracy
  after revision minus its accuracy alone.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from aiflow_fl.collab.fusion import mixture_logprobs


def option_scores(token_logprobs: torch.Tensor) -> torch.Tensor:
    """(..., O, T) per-token log-probabilities -> (..., O) sequence log-likelihoods."""
    return token_logprobs.sum(-1)


def fused_option_scores(token_logprobs: torch.Tensor, weights: Sequence[float]) -> torch.Tensor:
    """(k, O, T) members' per-token log-probs -> (O,) Σ_t log Σ_i w_i p_i(o_t) (weights renormalised)."""
    return mixture_logprobs(token_logprobs, weights).sum(-1)


def majority_vote(choices: Sequence[int], tie_break: torch.Tensor) -> int:
    """The most frequent choice; among tied ones the one with the highest ``tie_break`` score."""
    counts: dict[int, int] = {}
    for c in choices:
        counts[int(c)] = counts.get(int(c), 0) + 1
    best = max(counts.values())
    tied = [c for c, n in counts.items() if n == best]
    return max(tied, key=lambda c: float(tie_break[c]))


def revised_choice(own: torch.Tensor, synthesis: torch.Tensor) -> int:
    """argmax_o log softmax(own)_o + log softmax(synthesis)_o (see the module docstring)."""
    return int((torch.log_softmax(own.double(), -1) + torch.log_softmax(synthesis.double(), -1)).argmax())


def accuracy(choices: Sequence[int], answers: Sequence[int]) -> float:
    if len(choices) != len(answers):
        raise ValueError(f"{len(choices)} choices for {len(answers)} answers")
    return sum(int(c) == int(a) for c, a in zip(choices, answers)) / max(1, len(answers))


def perplexity_of(total_logprob: float, num_tokens: int) -> float:
    """exp(-Σ log p / tokens)."""
    return math.exp(-total_logprob / max(1, num_tokens))


__all__ = ["accuracy", "fused_option_scores", "majority_vote", "option_scores", "perplexity_of", "revised_choice"]
