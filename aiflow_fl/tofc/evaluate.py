"""Scoring a trained TOFC system on easy-VQA test questions: accuracy against real bytes per image.

Every method ends in the *same* edge model (projector + language member), so the accuracy
differences come from what crossed the link:

* ``tofc-λ``: DPC-KNN merged tokens through the λ codec, range-coded (:mod:`.bitstream`); bytes =
  the real bitstreams, decoded tokens = what the edge's decoder returns from them;
* ``merge-only``: the n_c merged tokens as raw float16 (no entropy model);
* ``uncompressed``: all 64 encoder tokens as raw float16;
* ``jpeg-Q`` / ``webp-Q``: the image compressed by Pillow at quality Q, decoded, then the encoder
  (on the edge) and all 64 tokens.

Pure scoring: the functions take tensors and return numbers; loading and caching live in
:mod:`.data` and :mod:`.system`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from aiflow_fl.tofc.bitstream import decode_fp16, decode_tokens, encode_fp16, encode_tokens


@dataclass
class TestSet:
    """Standardized test tokens of every image (N, 64, C), their merged tokens, and the questions scored."""

    tokens: torch.Tensor
    merged: torch.Tensor
    questions: list[str]
    answers: torch.Tensor
    image_index: torch.Tensor

    @property
    def images_used(self) -> list[int]:
        return sorted(set(self.image_index.tolist()))


@dataclass
class Point:
    """One method's figures: mean bytes per image and answer accuracy."""

    method: str
    bytes: float
    accuracy: float
    n_tokens: int


def _accuracy(edge, visual_by_image: dict[int, torch.Tensor], test: TestSet, batch_size: int = 32) -> float:
    """Answer accuracy when image i is seen as ``visual_by_image[i]`` (n, C)."""
    correct = 0
    rows = list(range(len(test.questions)))
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        visual = torch.stack([visual_by_image[int(test.image_index[r])] for r in chunk]).float()
        pred = edge.predict(visual, [test.questions[r] for r in chunk])
        correct += int((pred == test.answers[chunk]).sum())
    return correct / max(1, len(rows))


def tofc_point(edge, codec, lam: float, test: TestSet) -> tuple[Point, float]:
    """TOFC at one λ over real bitstreams; also returns the mean estimated-vs-real rate gap (relative)."""
    decoded, sizes, gaps = {}, [], []
    for i in test.images_used:
        encoded = encode_tokens(codec, test.merged[i])
        decoded[i] = decode_tokens(codec, encoded.data)  # what the edge's decoder gets back
        sizes.append(encoded.num_bytes)
        gaps.append(abs(8 * encoded.num_bytes - encoded.estimated_bits) / max(1.0, encoded.estimated_bits))
    point = Point(f"tofc-{lam:g}", float(np.mean(sizes)), _accuracy(edge, decoded, test), test.merged.shape[1])
    return point, float(np.mean(gaps))


def fp16_point(edge, method: str, tokens: torch.Tensor, test: TestSet) -> Point:
    """Raw float16 tokens (all 64: ``uncompressed``; the merged ones: ``merge-only``) over a real stream."""
    decoded, sizes = {}, []
    for i in test.images_used:
        data = encode_fp16(tokens[i])
        decoded[i] = decode_fp16(data, tokens.shape[-1])
        sizes.append(len(data))
    return Point(method, float(np.mean(sizes)), _accuracy(edge, decoded, test), tokens.shape[1])


def image_point(edge, method: str, tokens: torch.Tensor, sizes: torch.Tensor, test: TestSet) -> Point:
    """A decoded JPEG/WebP variant: its encoder tokens (standardized, N × 64 × C) and real file sizes."""
    used = test.images_used
    visual = {i: tokens[i] for i in used}
    return Point(method, float(sizes[used].double().mean()), _accuracy(edge, visual, test), tokens.shape[1])


def bytes_at_accuracy(curve: list[list[float]], accuracy: float) -> float | None:
    """Bytes a rate-accuracy curve needs to reach ``accuracy``: linear interpolation between the two
    neighbouring points of its upper envelope (accuracy made non-decreasing in bytes); None if the
    curve never reaches it."""
    points = sorted((float(b), float(a)) for b, a in curve)
    envelope, best = [], -1.0
    for b, a in points:
        best = max(best, a)
        envelope.append((b, best))
    if not envelope or envelope[-1][1] < accuracy:
        return None
    if envelope[0][1] >= accuracy:
        return envelope[0][0]
    for (b0, a0), (b1, a1) in zip(envelope, envelope[1:]):
        if a0 < accuracy <= a1:
            return b0 + (accuracy - a0) / (a1 - a0) * (b1 - b0)
    return None


def bytes_saved(tofc: list[list[float]], baseline: list[list[float]]) -> dict:
    """1 − bytes_TOFC / bytes_baseline at equal accuracy, at each accuracy the baseline reaches
    (its points) that TOFC also reaches; ``mean`` over those and the accuracies used."""
    rows = []
    for b_bytes, b_acc in sorted(baseline):
        t_bytes = bytes_at_accuracy(tofc, b_acc)
        base = bytes_at_accuracy(baseline, b_acc)  # the envelope's bytes (≤ this point's)
        if t_bytes is not None and base:
            rows.append({"accuracy": round(b_acc, 4), "baseline_bytes": round(base, 1), "tofc_bytes": round(t_bytes, 1),
                         "saved": round(1.0 - t_bytes / base, 4)})
    return {"mean": round(float(np.mean([r["saved"] for r in rows])), 4) if rows else None, "at": rows}


def answer_prior_accuracy(train_questions: list[str], train_answers: torch.Tensor, test_questions: list[str],
                          test_answers: torch.Tensor) -> float:
    """Accuracy of answering without the image: each test question gets the most frequent training
    answer of the same question text (else the most frequent answer overall). What a model that
    ignores the visual tokens can reach; an edge model must beat it for bytes-vs-accuracy to mean much."""
    from collections import Counter, defaultdict

    by_text: dict[str, Counter] = defaultdict(Counter)
    for question, answer in zip(train_questions, train_answers.tolist()):
        by_text[question][answer] += 1
    overall = Counter(train_answers.tolist()).most_common(1)[0][0]
    guesses = [by_text[q].most_common(1)[0][0] if q in by_text else overall for q in test_questions]
    return float((torch.tensor(guesses) == test_answers).float().mean())
