"""Training a feature-level draft head (EAGLE, arXiv 2401.15077) on the backbone's own answers.

Data fits the CPU: the backbone answers generic instructions greedily once, in batches
(:func:`aiflow_fl.family.instructions.self_answers`, cached); one batched forward over those
sequences gives the teacher's features (last hidden states after the final norm), cached once in
half precision (``$AIFLOW_CACHE/draft-head``). The teacher's greedy next token is the answer's own
next token, so no logits need caching at all. Training then touches only the head (FC + one
decoder layer, ~4 M parameters) and a frequency-ranked slice of the LM head (FR-Spec):

* inputs at position t: token ``x_t`` and the teacher feature ``f_{t-1}`` (+ uniform noise, as EAGLE);
* losses: smooth-L1 between ``f̂_t`` and ``f_t`` (feature regression) + cross-entropy of ``x_{t+1}``
  over the draft vocabulary, on answer positions;
* a second, unrolled step feeds the head its own ``f̂`` as the previous feature (what drafting
  several tokens does; "training-time test" of HASS / EAGLE-3), with the same losses.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from aiflow_fl.errors import AiflowError
from aiflow_fl.layers import decoder_of


@dataclass
class DraftHeadRecipe:
    draft_vocab: int = 8192  # frequency-ranked ids the head can propose (+ end-of-turn ids)
    epochs: int = 4
    batch_size: int = 8  # sequences per step
    lr: float = 1e-3
    noise: float = 0.1  # uniform feature noise U(-noise, noise)·rms(f) on the inputs (EAGLE)
    reg_weight: float = 1.0
    unroll: int = 2  # 1: teacher-forced only; 2: also one step from the head's own predicted feature
    seed: int = 0

    def key(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)


@dataclass
class TeacherData:
    sequences: list[torch.Tensor]  # (T_i,) prompt + answer ids
    features: list[torch.Tensor]  # (T_i, H) float16 teacher features
    prompt_lens: list[int]


@torch.inference_mode()
def teacher_features(backbone, sequences: list[torch.Tensor], prompt_lens: list[int], batch_size: int = 8,
                     cache_key: str | None = None) -> TeacherData:
    """The backbone's final-norm hidden states on each sequence (right-padded batches: padding after a
    sequence does not change its causal forward), cached by ``cache_key`` when given."""
    from aiflow_fl.files import atomic_torch_save
    from aiflow_fl.models import cache_dir

    path = cache_dir() / "draft-head" / f"features-{cache_key}.pt" if cache_key else None
    if path is not None and path.is_file():
        stored = torch.load(path)
        return TeacherData(stored["sequences"], stored["features"], stored["prompt_lens"])
    decoder = decoder_of(backbone)
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))  # similar lengths together: less padding
    out: dict[int, torch.Tensor] = {}
    for i in range(0, len(order), batch_size):
        group = order[i:i + batch_size]
        width = max(len(sequences[j]) for j in group)
        ids = torch.zeros((len(group), width), dtype=torch.long)
        mask = torch.zeros((len(group), width), dtype=torch.long)
        for row, j in enumerate(group):
            ids[row, :len(sequences[j])] = sequences[j]
            mask[row, :len(sequences[j])] = 1
        hidden = decoder(input_ids=ids, attention_mask=mask).last_hidden_state
        for row, j in enumerate(group):
            out[j] = hidden[row, :len(sequences[j])].to(torch.float16).clone()
    feats = [out[j] for j in range(len(sequences))]
    data = TeacherData(list(sequences), feats, list(prompt_lens))
    if path is not None:
        atomic_torch_save({"sequences": data.sequences, "features": data.features, "prompt_lens": data.prompt_lens}, path)
    return data


def frequent_vocab(sequences: list[torch.Tensor], prompt_lens: list[int], size: int, vocab_size: int,
                   always: list[int]) -> tuple[torch.Tensor, float]:
    """FR-Spec's draft vocabulary: the ``size`` ids most frequent in the answers (ties: lower id first)
    plus ``always``; and the share of answer tokens it covers."""
    counts = torch.zeros(vocab_size, dtype=torch.long)
    for seq, p in zip(sequences, prompt_lens):
        counts += torch.bincount(seq[p:], minlength=vocab_size)[:vocab_size]
    ranked = sorted(range(vocab_size), key=lambda i: (-int(counts[i]), i))[:size]
    ids = torch.unique(torch.tensor(ranked + list(always), dtype=torch.long))
    covered = float(counts[ids].sum()) / max(1, int(counts.sum()))
    return ids, covered


def _batch(data: TeacherData, index: list[int], vocab_index: torch.Tensor):
    """Padded tensors for sequences ``index``: inputs (x_t, f_{t-1}) for t = 1..T-1, targets f_t and
    x_{t+1}'s draft-vocabulary index (-100 outside the vocabulary, off the answer, or at padding)."""
    width = max(len(data.sequences[i]) for i in index) - 1
    H = data.features[index[0]].shape[1]
    tokens = torch.zeros((len(index), width), dtype=torch.long)
    feats = torch.zeros((len(index), width, H))
    target_f = torch.zeros((len(index), width, H))
    target_t = torch.full((len(index), width), -100, dtype=torch.long)
    valid = torch.zeros((len(index), width))
    mask = torch.zeros((len(index), width), dtype=torch.long)
    for row, i in enumerate(index):
        seq, f, p = data.sequences[i], data.features[i].float(), data.prompt_lens[i]
        n = len(seq) - 1
        tokens[row, :n] = seq[1:]
        feats[row, :n] = f[:-1]
        target_f[row, :n] = f[1:]
        mask[row, :n] = 1
        # output j is position t = j + 1, predicting x_{t+1} = seq[j + 2]: an answer token when j + 2 >= p
        nxt = vocab_index[seq[2:]]
        lo = max(0, p - 2)
        target_t[row, lo:n - 1] = nxt[lo:]
        valid[row, max(0, p - 2):n] = 1
    return tokens, feats, target_f, target_t, valid, mask


def train_draft_head(head, data: TeacherData, recipe: DraftHeadRecipe, progress=None) -> dict:
    """AdamW with cosine decay over ``recipe.epochs`` passes (module docstring); returns loss figures."""
    torch.manual_seed(recipe.seed)
    vocab_index = torch.full((head.config.vocab_size,), -100, dtype=torch.long)
    vocab_index[head.vocab] = torch.arange(head.vocab.numel())
    params = [p for p in head.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=recipe.lr, weight_decay=0.0)
    steps_per_epoch = math.ceil(len(data.sequences) / recipe.batch_size)
    total = steps_per_epoch * recipe.epochs
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / 20) * 0.5 * (1 + math.cos(math.pi * min(s, total) / total)))
    gen = torch.Generator().manual_seed(recipe.seed)
    losses: list[float] = []
    head.train()
    for epoch in range(recipe.epochs):
        order = torch.randperm(len(data.sequences), generator=gen).tolist()
        for s in range(steps_per_epoch):
            index = order[s * recipe.batch_size:(s + 1) * recipe.batch_size]
            tokens, feats, target_f, target_t, valid, mask = _batch(data, index, vocab_index)
            rms = feats.pow(2).mean(-1, keepdim=True).sqrt()
            noisy = feats + (torch.rand(feats.shape, generator=gen) * 2 - 1) * recipe.noise * rms
            loss = torch.zeros(())
            previous = noisy
            for step in range(recipe.unroll):
                predicted, logits = head(tokens, previous, start=1, attention_mask=mask)
                reg = (F.smooth_l1_loss(predicted, target_f, reduction="none").mean(-1) * valid).sum() / valid.sum().clamp_min(1)
                ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target_t.view(-1), ignore_index=-100)
                loss = loss + recipe.reg_weight * reg + ce
                # next unrolled step: position t reads the head's own f̂_{t-1} (teacher feature at t = 1)
                previous = torch.cat([feats[:, :1], predicted[:, :-1]], dim=1)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            schedule.step()
            losses.append(float(loss.detach()))
            if progress is not None:
                progress(epoch, s, float(loss))
    head.eval()
    return {"steps": len(losses), "first_loss": round(sum(losses[:10]) / max(1, len(losses[:10])), 4),
            "last_loss": round(sum(losses[-10:]) / max(1, len(losses[-10:])), 4)}


@torch.inference_mode()
def head_agreement(head, data: TeacherData, steps: int = 3) -> dict[str, float]:
    """Teacher-forced agreement of the head's greedy token with the backbone's on answer positions:
    ``1``: from the true previous feature; ``k``: after k − 1 steps on its own predicted features
    (the k-th token of a draft block, given the first k − 1 were right)."""
    hits = [0] * steps
    count = 0
    for i in range(len(data.sequences)):
        seq, f, p = data.sequences[i], data.features[i].float(), data.prompt_lens[i]
        if len(seq) - p < 2:
            continue
        tokens, feats = seq[1:].view(1, -1), f[:-1].view(1, len(seq) - 1, -1)
        previous = feats
        target = seq[2:]
        lo = max(0, p - 2)
        for k in range(steps):
            predicted, logits = head(tokens, previous, start=1)
            guess = head.vocab[logits[0, :-1].argmax(-1)]
            # step k uses features predicted k times: valid from position lo + k
            hits[k] += int((guess[lo + k:] == target[lo + k:]).sum())
            previous = torch.cat([feats[:, :1], predicted[:, :-1]], dim=1)
        count += len(target) - lo
    return {str(k + 1): round(hits[k] / max(1, count), 4) for k in range(steps)}


def draft_head_for(backbone, tokenizer, recipe: DraftHeadRecipe, instructions_count: int = 0, max_new_tokens: int = 64,
                   show_progress: bool = True, tasks_count: int | None = None) -> tuple[object, dict]:
    """The trained draft head for ``backbone`` (cached in ``$AIFLOW_CACHE/draft-head`` by weights and
    recipe), and its training record (train_s, vocabulary coverage, losses). Its data: the backbone's
    answers to ``instructions_count`` everyday instructions and, unless ``tasks_count`` is None, to that
    many task instructions (:func:`~aiflow_fl.family.instructions.task_instructions`; 0: all of each)."""
    from aiflow_fl.family.instructions import SelfAnswers, instructions, model_fingerprint, self_answers, task_instructions
    from aiflow_fl.models import cache_dir
    from aiflow_fl.serving.build import eos_ids
    from aiflow_fl.serving.draft_head import DraftHead, load_draft_head, save_draft_head

    fingerprint = model_fingerprint(backbone)
    counts = [instructions_count] if tasks_count is None else [instructions_count, tasks_count]  # old keys stay valid
    key = hashlib.sha256(json.dumps([fingerprint, recipe.key(), *counts, max_new_tokens]).encode()).hexdigest()[:16]
    path = cache_dir() / "draft-head" / f"head-{key}.safetensors"
    if path.is_file():
        head = load_draft_head(path, backbone, fingerprint)
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as handle:
            return head, json.loads(handle.metadata()["info"])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small GEMMs on shared cores: one thread is fastest (see self_answers)
    started = time.perf_counter()
    try:
        prompts = instructions(instructions_count)
        answers = self_answers(backbone, tokenizer, prompts, max_new_tokens, batch_size=16, show_progress=show_progress)
        if tasks_count is not None:  # answered and cached apart: the everyday answers' cache stays valid
            tasks = task_instructions(tasks_count)
            more = self_answers(backbone, tokenizer, tasks, max_new_tokens, batch_size=16, show_progress=show_progress)
            answers = SelfAnswers(answers.sequences + more.sequences, answers.prompt_lens + more.prompt_lens)
            prompts = prompts + tasks
        generated_s = time.perf_counter() - started
        data = teacher_features(backbone, answers.sequences, answers.prompt_lens,
                                cache_key=hashlib.sha256(json.dumps([fingerprint, len(prompts), max_new_tokens, *counts[1:]]).encode()).hexdigest()[:16])
        features_s = time.perf_counter() - started - generated_s
        vocab, coverage = frequent_vocab(data.sequences, data.prompt_lens, recipe.draft_vocab, backbone.config.vocab_size,
                                         eos_ids(backbone, tokenizer))
        head = DraftHead(backbone, vocab)
        line = {"at": time.perf_counter()}

        def progress(epoch: int, step: int, loss: float) -> None:
            if time.perf_counter() - line["at"] > 30:
                line["at"] = time.perf_counter()
                print(f"draft head: epoch {epoch + 1}/{recipe.epochs} step {step} loss {loss:.3f}", flush=True)

        record = train_draft_head(head, data, recipe, progress if show_progress else None)
    finally:
        torch.set_num_threads(threads)
    info = {**record, "train_s": round(time.perf_counter() - started, 1), "answers_s": round(generated_s, 1),
            "features_s": round(features_s, 1), "sequences": len(data.sequences),
            "answer_tokens": sum(len(s) - p for s, p in zip(data.sequences, data.prompt_lens)),
            "vocab_coverage": round(coverage, 4), "head_parameters": head.parameters_count(), "recipe": asdict(recipe)}
    save_draft_head(head, path, fingerprint, info)
    return head, info


def check_recipe(recipe: DraftHeadRecipe) -> None:
    if recipe.draft_vocab < 1 or recipe.epochs < 1 or recipe.batch_size < 1 or recipe.unroll < 1 or recipe.lr <= 0:
        raise AiflowError(f"Draft head recipe needs draft_vocab, epochs, batch_size, unroll ≥ 1 and lr > 0 (got {recipe}).")


__all__ = ["DraftHeadRecipe", "TeacherData", "teacher_features", "frequent_vocab", "train_draft_head", "head_agreement",
           "draft_head_for", "check_recipe"]
