"""The feature-level draft head (EAGLE): lossless chains, training that helps, files checked before use."""

from __future__ import annotations

import pytest
import torch

from aiflow_fl.errors import AiflowError
from aiflow_fl.family.feature_draft import DraftHeadRecipe, frequent_vocab, head_agreement, teacher_features, train_draft_head
from aiflow_fl.models import tiny_model
from aiflow_fl.serving.build import head_chain
from aiflow_fl.serving.draft_head import DraftHead, load_draft_head, save_draft_head
from aiflow_fl.family.member import early_exit_member
from test_specdec import one_thread, reference, scrambled  # noqa: F401  (one_thread: autouse fixture)


def _answers(model, count: int, prompt_len: int = 6, new: int = 24, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    seqs = []
    with torch.inference_mode():
        for _ in range(count):
            ids = torch.randint(3, 500, (1, prompt_len), generator=gen)
            seqs.append(model.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False)[0])
    return seqs, [prompt_len] * count


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_head_chains_equal_transformers_generate(arch):
    """Whatever the head proposes (here: untrained, over half the vocabulary), the chain outputs
    generate()'s tokens: fixed, adaptive and cost-aware draft lengths, several prompts."""
    model = scrambled(arch)
    head = DraftHead(model, torch.arange(0, model.config.vocab_size, 2))
    full = early_exit_member(model, "full")
    for seed, prompt_len in [(0, 5), (1, 9)]:
        ids = torch.randint(3, 500, (1, prompt_len), generator=torch.Generator().manual_seed(seed))
        expected = reference(model, ids, 20)
        for options in [dict(draft_len=3), dict(draft_len=1), dict(draft_len=2, adaptive=True),
                        dict(draft_len=4, cost_aware=True, probe_every=3, probe_budget=1.0)]:
            chain = head_chain(head, full, eos_token_ids=[], **options)
            result = chain.generate(ids, 20)
            assert result.tokens == expected, options
            tier = result.stats["tiers"][1]
            assert tier["drafted"] > 0 and tier["bytes_down"] > 0


def test_trained_head_fits_the_teachers_answers_and_gets_drafts_accepted():
    """Training on the model's own greedy answers raises the head's agreement with them (tiny random
    models are too small a world to show held-out gains: the real one is measured by bench specdec),
    and a chain with the trained head gets drafts accepted while staying generate()'s."""
    model = scrambled("llama", std=0.05)
    seqs, lens = _answers(model, 32)
    data = teacher_features(model, seqs, lens)
    vocab, coverage = frequent_vocab(seqs, lens, 256, model.config.vocab_size, [0])
    assert 0.5 < coverage <= 1.0
    head = DraftHead(model, vocab, init_from_last_layer=False)
    before = head_agreement(head, data)
    record = train_draft_head(head, data, DraftHeadRecipe(epochs=12, batch_size=8, lr=1e-3))
    after = head_agreement(head, data)
    assert record["last_loss"] < record["first_loss"]
    assert after["1"] > before["1"] + 0.15 and after["3"] > before["3"], (before, after)
    ids = seqs[0][:6].view(1, -1)
    result = head_chain(head, early_exit_member(model, "full"), eos_token_ids=[], draft_len=3).generate(ids, 24)
    assert result.tokens == seqs[0][6:].tolist()
    assert result.stats["tiers"][1]["accepted"] > 0


def test_head_files_round_trip_and_mismatches_are_named(tmp_path):
    model = tiny_model("llama", num_layers=4)
    head = DraftHead(model, torch.arange(100))
    path = tmp_path / "head.safetensors"
    save_draft_head(head, path, "abc")
    loaded = load_draft_head(path, model, "abc")
    tokens, feats = torch.tensor([[5, 6, 7]]), torch.randn(1, 3, model.config.hidden_size)
    with torch.inference_mode():
        assert torch.equal(loaded(tokens, feats)[1], head(tokens, feats)[1])
    with pytest.raises(AiflowError, match="other backbone weights"):
        load_draft_head(path, model, "another")
    for change, word in [(dict(hidden_size=48), "hidden_size"), (dict(vocab_size=900), "vocab_size"), (dict(num_layers=3), "num_hidden_layers")]:
        other = tiny_model("llama", **change)
        with pytest.raises(AiflowError, match=word):
            load_draft_head(path, other)
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(AiflowError, match="truncated"):
        load_draft_head(truncated, model)
    other = tiny_model("llama", hidden_size=48)
    with pytest.raises(AiflowError, match="hidden_size"):
        head_chain(head, early_exit_member(other, "full"))


def test_auto_picks_the_head_trained_on_most_tokens_for_these_weights(tmp_path, monkeypatch):
    """serving.draft_head=auto: among cached heads for the verifier's weights, the one trained on the most
    answer tokens, even when a shorter (--quick) training is newer; heads for other weights never."""
    import os

    from aiflow_fl.family.instructions import model_fingerprint
    from aiflow_fl.serving.draft_head import find_draft_head, resolve_draft_head

    monkeypatch.setenv("AIFLOW_CACHE", str(tmp_path))
    model = tiny_model("llama", num_layers=4)
    folder = tmp_path / "draft-head"
    assert find_draft_head(model) is None and resolve_draft_head("auto", model) is None
    fingerprint = model_fingerprint(model)
    save_draft_head(DraftHead(model, torch.arange(100)), folder / "head-full.safetensors", fingerprint, {"answer_tokens": 48000})
    save_draft_head(DraftHead(model, torch.arange(50)), folder / "head-quick.safetensors", fingerprint, {"answer_tokens": 384})
    save_draft_head(DraftHead(model, torch.arange(10)), folder / "head-other.safetensors", "another-model", {"answer_tokens": 10**6})
    os.utime(folder / "head-full.safetensors", (1, 1))  # the full one is the oldest
    assert find_draft_head(model) == folder / "head-full.safetensors"
    assert resolve_draft_head("auto", model).vocab.numel() == 100


def test_draft_head_for_trains_on_both_instruction_sets_and_caches(tmp_path, monkeypatch, tokenizer):
    """The head's data: the everyday instructions' answers and the task instructions' (cached apart:
    the everyday answers' cache is reused as it is), the head cached by weights, recipe and counts."""
    from aiflow_fl.family.feature_draft import draft_head_for
    from aiflow_fl.family.instructions import instructions, self_answers, task_instructions

    monkeypatch.setenv("AIFLOW_CACHE", str(tmp_path))
    model = tiny_model("llama", num_layers=3, hidden_size=32).eval()
    recipe = DraftHeadRecipe(draft_vocab=64, epochs=1, batch_size=2)
    head, info = draft_head_for(model, tokenizer, recipe, 3, 4, show_progress=False, tasks_count=2)
    everyday = self_answers(model, tokenizer, instructions(3), 4, show_progress=False)
    tasks = self_answers(model, tokenizer, task_instructions(2), 4, show_progress=False)
    assert len(list((tmp_path / "selfdistill").glob("*.pt"))) == 2  # both read back from cache above
    assert info["sequences"] == 5
    assert info["answer_tokens"] == sum(len(s) - p for a in (everyday, tasks) for s, p in zip(a.sequences, a.prompt_lens))
    again, info_again = draft_head_for(model, tokenizer, recipe, 3, 4, show_progress=False, tasks_count=2)
    assert info_again == info and torch.equal(again.vocab, head.vocab)
    _, alone = draft_head_for(model, tokenizer, recipe, 3, 4, show_progress=False)  # no task set: another head
    assert alone["sequences"] == 3
