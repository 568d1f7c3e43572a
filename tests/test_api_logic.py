"""The serving API's pure parts without HTTP: scheduling, the padded batch KV cache, text and stop
strings, sampling, request limits, the tier protocol's session rules."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from test_specdec import one_thread, reference, scrambled  # noqa: F401  (one_thread: autouse fixture)

from aiflow_fl.serving.api.batch import MemberEngine
from aiflow_fl.serving.api.errors import APIError
from aiflow_fl.serving.api.limits import completion_budget
from aiflow_fl.serving.api.sampling import nucleus_probs
from aiflow_fl.serving.api.scheduler import Scheduler, Sequence
from aiflow_fl.serving.api.text import TextStream, held_back
from aiflow_fl.family.member import early_exit_members
from aiflow_fl.serving.server import TierSessions, pack, unpack

CHARS = {i: chr(ord("a") + i % 26) for i in range(600)}


def decode(ids: list[int]) -> str:
    return "".join(CHARS[i] for i in ids)


def collect(prompt: list[int], n: int, **kw):
    done, out = threading.Event(), {"ids": [], "text": "", "finish": None}

    def emit(event):
        out["ids"] += event.token_ids
        out["text"] += event.text
        if event.final:
            out["finish"] = event.finish_reason or event.error
            done.set()

    return Sequence(prompt, n, emit, TextStream(decode, kw.pop("stop", None)), **kw), done, out


def test_scheduler_admits_up_to_the_batch_and_frees_slots_at_once():
    s = Scheduler(2)
    seqs = [collect([1], 3)[0] for _ in range(4)]
    for q in seqs:
        s.submit(q)
    seqs[2].cancelled.set()  # cancelled while waiting: never admitted
    assert s.admit() == seqs[:2] and s.admit() == []
    seqs[0].record(5)
    seqs[0].record(6)
    seqs[0].record(7)  # max_new_tokens reached
    assert seqs[0].finish_reason == "length" and s.retire() == [1]
    assert s.admit() == [seqs[3]] and s.running == [seqs[1], seqs[3]]
    seqs[1].cancelled.set()
    assert s.retire() == [1] and s.running == [seqs[3]]


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_batched_decoding_equals_generate_for_every_row(arch):
    """Rows of different lengths, joining while others run and leaving early, each equal generate()."""
    model = scrambled(arch).eval()
    engine = MemberEngine(model, max_batch=4)
    gen = torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, 500, (int(k),), generator=gen).tolist() for k in (3, 9, 5, 14, 7, 2)]
    lengths = [12, 4, 9, 12, 6, 10]
    runs = [collect(p, n) for p, n in zip(prompts, lengths)]
    try:
        for seq, _, _ in runs[:3]:
            engine.submit(seq)
        runs[1][1].wait(30)  # the shortest ends; two still run
        for seq, _, _ in runs[3:]:  # arrive while the batch runs (two wait for a free slot)
            engine.submit(seq)
        for _, done, _ in runs:
            assert done.wait(30)
    finally:
        engine.close()
    for prompt, n, (_, _, out) in zip(prompts, lengths, runs):
        assert out["ids"] == reference(model, torch.tensor([prompt]), n)
        assert out["finish"] == "length" and out["text"] == decode(out["ids"])
    assert max(engine.steps) == 4 and min(engine.steps) >= 1  # decoded together, never above the batch


def test_requests_arriving_together_are_prefilled_together_and_equal_generate():
    """Prompts of different lengths admitted at one step: one left-padded prefill forward, then each
    row's greedy answer is generate()'s of that prompt alone."""
    model = scrambled("llama").eval()
    engine = MemberEngine(model, max_batch=8)
    gen = torch.Generator().manual_seed(7)
    prompts = [torch.randint(3, 500, (int(k),), generator=gen).tolist() for k in (11, 2, 6, 17, 1)]
    runs = [collect(p, 8) for p in prompts]
    try:
        with engine.wake:  # the engine cannot admit until every request waits
            for seq, _, _ in runs:
                engine.submit(seq)
        for _, done, _ in runs:
            assert done.wait(30)
    finally:
        engine.close()
    assert engine.prefills == [5]
    for prompt, (_, _, out) in zip(prompts, runs):
        assert out["ids"] == reference(model, torch.tensor([prompt]), 8)


def test_a_shared_prompt_prefix_is_computed_once_and_answers_equal_generate():
    """Prompts sharing a 20-id prefix (a system prompt): after the first, the prefix's KV is reused, alone
    and for rows prefilled together (padding between prefix and rest); every answer equals generate()."""
    model = scrambled("llama").eval()
    engine = MemberEngine(model, max_batch=8, prefix_min=8)
    gen = torch.Generator().manual_seed(11)
    system = torch.randint(3, 500, (20,), generator=gen).tolist()
    prompts = [system + torch.randint(3, 500, (int(k),), generator=gen).tolist() for k in (3, 9, 1, 6, 12)]
    runs = [collect(p, 8) for p in prompts]
    try:
        for seq, done, _ in runs[:2]:  # the first alone: nothing known to be shared; the second reuses
            engine.submit(seq)
            assert done.wait(30)
        assert engine.prefix_hits == 1 and engine.prefix_ids == system
        with engine.wake:
            for seq, _, _ in runs[2:]:
                engine.submit(seq)
        for _, done, _ in runs:
            assert done.wait(30)
    finally:
        engine.close()
    assert engine.prefix_hits == 4 and engine.prefills == [1, 1, 3]
    for prompt, (_, _, out) in zip(prompts, runs):
        assert out["ids"] == reference(model, torch.tensor([prompt]), 8)


def test_cancelled_request_leaves_the_batch():
    model = scrambled("llama").eval()
    engine = MemberEngine(model, max_batch=4)
    long, long_done, long_out = collect([5, 6, 7], 400)
    short, short_done, _ = collect([8, 9], 5)
    try:
        engine.submit(long)
        engine.submit(short)
        assert short_done.wait(30)
        engine.cancel(long)
        for _ in range(100):
            if not engine.scheduler.running:
                break
            threading.Event().wait(0.05)
        assert engine.scheduler.running == [] and len(long_out["ids"]) < 400 and not long_done.is_set()
    finally:
        engine.close()


def test_stop_strings_and_held_back_text():
    assert held_back("abcST", ["STOP"]) == 2 and held_back("abc", ["STOP"]) == 0 and held_back("ab\ufffd", []) == 1
    stream = TextStream(decode, ["cde"])
    released = "".join(stream.push([i]) for i in range(2))  # "ab"
    assert released == "ab" and stream.push([2]) == "" and stream.push([3]) == ""  # "c", "cd" held back
    assert stream.push([4]) == "" and stream.stopped and stream.text == "ab"
    plain = TextStream(decode, ["zz"])
    assert plain.push([25]) == "" and plain.finish() == "z"  # held "z" released at the end
    seq, _, out = collect([1], 10, stop=["cd"])
    for token in (0, 1, 2, 3, 4):
        seq.record(token)
    assert out["text"] == "ab" and out["finish"] == "stop" and len(seq.generated) == 4


def test_eos_ends_with_stop_and_is_not_text():
    seq, _, out = collect([1], 10, eos=frozenset({7}))
    for token in (0, 7, 1):
        seq.record(token)
    assert out["finish"] == "stop" and out["text"] == "a" and seq.generated == [0, 7]


def test_nucleus_keeps_the_smallest_top_set():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    assert torch.allclose(nucleus_probs(logits, 1.0, 0.7), torch.tensor([0.5, 0.3, 0, 0]) / 0.8)
    assert torch.allclose(nucleus_probs(logits, 1.0, 0.01), torch.tensor([1.0, 0, 0, 0]))
    assert torch.allclose(nucleus_probs(logits, 1.0), torch.tensor([0.5, 0.3, 0.15, 0.05]), atol=1e-6)
    a, b = collect([1], 5, temperature=1.0, seed=4)[0], collect([1], 5, temperature=1.0, seed=4)[0]
    assert [a.choose(logits) for _ in range(20)] == [b.choose(logits) for _ in range(20)]


def test_completion_budget_words_like_vllm():
    assert completion_budget(10, None, 100, 50, 30) == 30 and completion_budget(90, None, 100, 50, 30) == 10
    assert completion_budget(10, 40, 100, 50, 30) == 40
    with pytest.raises(APIError, match="above this server's limit of 50") as cap:
        completion_budget(10, 51, 100, 50, 30)
    assert cap.value.status == 400 and cap.value.param == "max_tokens"
    with pytest.raises(APIError, match="maximum context length is 100 tokens. However, your request has 120 input tokens"):
        completion_budget(120, None, 100, 50, 30)
    with pytest.raises(APIError, match=r"you requested 130 tokens \(90 in the messages, 40 in the completion\)"):
        completion_budget(90, 40, 100, 50, 30)


def _frame(session: str, start: int, tokens: list[int], **more) -> bytes:
    header = {"session": session, "start": start, "entry": 0, "temperature": 0.0, "want_hidden": False,
              "kind": "tokens", "n": len(tokens), **more}
    return pack(header, np.array(tokens, dtype=np.int32))


def test_tier_sessions_refuse_what_they_do_not_hold():
    """Unknown/evicted sessions and gaps are explicit errors; bad headers are 400s; answers equal generate()."""
    from aiflow_fl.serving.server import TierRequestError

    model = scrambled("llama").eval()
    member = early_exit_members(model, [3])[1]  # the full model
    sessions = TierSessions({"full": member}, {"full": 64}, max_sessions=2)
    ids = [5, 9, 14, 3, 7]
    header, data = unpack(sessions.process(_frame("a", 0, ids)))
    first = int(np.frombuffer(data, dtype=np.int32)[-1])
    assert first == reference(model, torch.tensor([ids]), 1)[0]
    unpack(sessions.process(_frame("a", len(ids), [first])))  # continues its own cache

    def status(body: bytes) -> tuple[int, str]:
        with pytest.raises(TierRequestError) as err:
            sessions.process(body)
        return err.value.status, err.value.code

    assert status(_frame("never", 3, [1])) == (409, "session_unknown")
    assert status(_frame("a", 9, [1])) == (409, "session_gap")
    sessions.process(_frame("b", 0, [1]))
    sessions.process(_frame("c", 0, [1]))  # a third session evicts the least recently used ("a")
    assert sessions.evicted == 1 and status(_frame("a", 6, [1])) == (409, "session_unknown")
    assert status(b"\x00\x00") == (400, "invalid_frame")
    assert status(_frame("d", 0, [1], extra=1)) == (400, "invalid_header")
    assert status(_frame("d", -1, [1])) == (400, "invalid_header")
    assert status(_frame("d", 0, [1], n=3)) == (400, "invalid_frame")
    assert status(_frame("d", 0, [10**6])) == (400, "invalid_tokens")
    assert status(_frame("d", 60, list(range(8)))) == (400, "context_length_exceeded")
    assert status(_frame("d", 0, [1], member="nope")) == (404, "model_not_found")
