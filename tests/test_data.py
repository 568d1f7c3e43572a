"""Private data: sources, domain-pure chunks, held-out split and flwr-datasets partitions."""

from __future__ import annotations

import json
from collections import Counter

import pytest
import torch

from aiflow_fl.data import (
    Document,
    device_data,
    load_chunks,
    load_documents,
    partition_indices,
    split_heldout,
    tokenize_documents,
)
from aiflow_fl.errors import AiflowError


def test_chunks_never_mix_domains_and_follow_the_token_stream(tokenizer):
    docs = [Document("a", "alpha beta gamma " * 40), Document("b", "one two three " * 40), Document("a", "delta " * 30)]
    chunks = tokenize_documents(docs, tokenizer, seq_len=16)
    eos = tokenizer.eos_token_id
    for domain in ("a", "b"):
        stream = []
        for d in docs:
            if d.domain == domain:
                stream += tokenizer(d.text, add_special_tokens=False)["input_ids"] + [eos]
        rows = [r for r, dom in zip(chunks.input_ids.tolist(), chunks.domains) if dom == domain]
        assert len(rows) == len(stream) // 16
        assert rows == [stream[i * 16:(i + 1) * 16] for i in range(len(rows))]


def test_builtin_sources_have_many_domains(tokenizer):
    pydoc = load_chunks("pydoc", tokenizer, 128)
    stdlib = load_chunks("stdlib", tokenizer, 128)
    assert len(set(pydoc.domains)) > 40 and len(pydoc) > 500
    assert {"json", "asyncio", "email"} <= set(stdlib.domains)
    assert pydoc.input_ids.shape[1] == 128 and pydoc.input_ids.dtype == torch.long


def test_heldout_is_disjoint_and_covers_every_domain(tokenizer):
    chunks = load_chunks("pydoc", tokenizer, 128)
    train, held = split_heldout(chunks, 0.1, seed=3)
    assert len(train) + len(held) == len(chunks)
    rows = lambda c: {tuple(r) for r in c.input_ids.tolist()}  # noqa: E731
    assert not rows(train) & rows(held)
    multi = {d for d, n in Counter(chunks.domains).items() if n >= 2}
    assert multi <= set(held.domains)


def _histograms(domains, parts):
    names = sorted(set(domains))
    out = []
    for p in parts:
        c = Counter(domains[i] for i in p)
        out.append(torch.tensor([c[n] / max(len(p), 1) for n in names]))
    return out


def _mean_tv_to_global(domains, parts):
    """Mean total-variation distance between each device's domain mix and the global mix."""
    names = sorted(set(domains))
    glob = Counter(domains)
    g = torch.tensor([glob[n] / len(domains) for n in names])
    return sum(0.5 * (h - g).abs().sum().item() for h in _histograms(domains, parts)) / len(parts)


def test_partitions_are_disjoint_and_dirichlet_is_skewed_where_iid_is_not(tokenizer):
    chunks = load_chunks("stdlib", tokenizer, 128)
    train, _ = split_heldout(chunks, 0.1, 0)
    iid = partition_indices(train.domains, 4, "iid", seed=0)
    dirichlet = partition_indices(train.domains, 4, "dirichlet", alpha=0.3, seed=0)
    for parts in (iid, dirichlet):
        flat = [i for p in parts for i in p]
        assert len(flat) == len(set(flat))
        assert all(len(p) > 0 for p in parts)
    assert _mean_tv_to_global(train.domains, dirichlet) > 3 * _mean_tv_to_global(train.domains, iid)
    patho = partition_indices(train.domains, 4, "pathological", classes_per_partition=2, seed=0)
    assert all(len({train.domains[i] for i in p}) <= 2 for p in patho)


def test_device_data_is_deterministic_and_heldout_matches_its_domains(tokenizer):
    chunks = load_chunks("stdlib", tokenizer, 128)
    a = device_data(chunks, 1, 3, partitioner="pathological", classes_per_partition=2, max_train=50, max_heldout=20)
    b = device_data(chunks, 1, 3, partitioner="pathological", classes_per_partition=2, max_train=50, max_heldout=20)
    assert torch.equal(a.train.input_ids, b.train.input_ids) and len(a.train) == 50
    assert set(a.heldout.domains) <= set(a.train.domains) and len(a.heldout) > 0
    with pytest.raises(AiflowError, match="partition-id"):
        device_data(chunks, 3, 3)


def test_user_jsonl_and_text_files(tmp_path, tokenizer):
    jsonl = tmp_path / "mine.jsonl"
    jsonl.write_text(
        json.dumps({"text": "plain text", "domain": "notes"}) + "\n\n"
        + json.dumps({"instruction": "Say hi", "response": "hi"}) + "\n"
    )
    (tmp_path / "diary.txt").write_text("first entry\n\nsecond entry\n")
    docs = load_documents(str(tmp_path), tokenizer)
    assert [d.domain for d in docs] == ["diary", "diary", "notes", "mine"]
    assert "Say hi" in docs[3].text and "hi" in docs[3].text and docs[3].text.count("assistant") >= 1


@pytest.mark.parametrize(
    "content, words",
    [
        ('{"text": "ok"}\n{not json}\n', ["line 2", "not valid JSON"]),
        ('{"txt": "typo"}\n', ["line 1", "txt", "instruction"]),
    ],
)
def test_bad_user_files_raise_a_clear_error(tmp_path, tokenizer, content, words):
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    with pytest.raises(AiflowError) as info:
        load_documents(str(path), tokenizer)
    for word in words:
        assert word in str(info.value)


def test_missing_source_and_too_short_data_are_errors(tmp_path, tokenizer):
    with pytest.raises(AiflowError, match="neither a builtin source"):
        load_documents(str(tmp_path / "nope.jsonl"))
    with pytest.raises(AiflowError, match="seq_len"):
        tokenize_documents([Document("x", "short")], tokenizer, 512)
