"""Real `aiflow serve` processes on loopback, asked through the official openai client (issue #12):
token-for-token answers of a member and of a chain against transformers' generate(), API key and bad
input handling, sessions evicted under load, and a verifier process killed mid-stream under both
``serving.on_verifier_loss`` policies. Every server runs on one tiny random family and is always stopped.

Token ids come back honestly: every response (and every streamed chunk) carries the ids it decoded
in its ``aiflow.token_ids`` extra field, so answers are compared as ids, not as re-tokenized text.
"""

from __future__ import annotations

import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
import torch
from openai import OpenAI
from test_specdec import scrambled

from aiflow_fl.config import FamilyConfig
from aiflow_fl.family.family import family_from_backbone
from aiflow_fl.family.member import load_family_member
from aiflow_fl.serving.api.main import Launched, start, stop
from aiflow_fl.serving.build import eos_ids

KEY = "sk-test-key"
PROMPTS = [f"Question {i}: what is {i} plus {2 * i}?" for i in range(8)]
CHAIN = "eesb-0>full"
# every server: one torch thread (tiny models, 2 shared cores); fixed-length drafting (cost-aware drafting
# may decode with the verifier alone, and these tests are about verification)
COMMON = ["--threads", "1", "serving.cost_aware=false", "serving.draft_len=3"]
WITH_CHAIN = [*COMMON, f"serving.chains=[{CHAIN}]"]


@pytest.fixture(scope="module")
def family_dir(tmp_path_factory, tokenizer):
    """A tiny EESB family (eesb-0: exit at layer 2 + a branch; full: 4 layers) whose weights make the
    early exit disagree with the full model often, so chains see rejections as well as acceptances."""
    model = scrambled("llama", layers=4, vocab=49152)
    batches = [torch.randint(3, 500, (2, 16), generator=torch.Generator().manual_seed(i)) for i in range(2)]
    family = family_from_backbone(model, tokenizer, FamilyConfig(kind="eesb", exits=[2], ratios=[0.5]), batches=batches)
    return family.save(tmp_path_factory.mktemp("families") / "tiny")


class Reference:
    """transformers' greedy generate() of each member: the independent reference (it stops at EOS as the server does)."""

    def __init__(self, family_dir, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.models = {name: load_family_member(str(family_dir), name).model.eval() for name in ("eesb-0", "full")}
        self.done: dict[tuple, list[int]] = {}

    def eos(self, name: str) -> set[int]:
        return set(eos_ids(self.models[name], self.tokenizer))

    def __call__(self, name: str, prompt: str, n: int) -> list[int]:
        if (name, prompt, n) not in self.done:
            model, ids = self.models[name], torch.tensor([self.tokenizer(prompt)["input_ids"]])
            with torch.inference_mode():
                out = model.generate(ids, max_new_tokens=n, do_sample=False, eos_token_id=sorted(self.eos(name)),
                                     pad_token_id=self.tokenizer.eos_token_id)
            self.done[(name, prompt, n)] = out[0, ids.shape[1]:].tolist()
        return self.done[(name, prompt, n)]


@pytest.fixture(scope="module")
def reference(family_dir, tokenizer):
    return Reference(family_dir, tokenizer)


def start_all(*arg_lists: list[str]) -> list[Launched]:
    """Start several servers at once (each loads in its own process); stop them all if one fails."""
    with ThreadPoolExecutor(len(arg_lists)) as pool:
        futures = [pool.submit(start, args, 180) for args in arg_lists]
    servers, failure = [], None
    for future in futures:
        try:
            servers.append(future.result())
        except Exception as exc:  # noqa: BLE001  (re-raised once the others are stopped)
            failure = exc
    if failure is not None:
        for server in servers:
            stop(server.proc)
        raise failure
    return servers


@pytest.fixture(scope="module")
def fleet(family_dir):
    """Two verifier tiers, each its own ``aiflow serve --tier edge --member full`` process (the first holds
    only 2 sessions), and a device server per ``on_verifier_loss`` policy: eesb-0 runs in it (a plain
    member, and the drafter of the chain eesb-0>full, whose verifier is its tier process). All behind
    one API key (the tier protocol too), with a context of 128 tokens."""
    family, limits = str(family_dir), ["--api-key", KEY, "serving.api.max_model_len=128"]
    servers: dict[str, Launched] = {}
    try:
        edge_fail, edge_device = start_all([family, "--tier", "edge", "--member", "full", "serving.api.max_sessions=2", *limits, *COMMON],
                                           [family, "--tier", "edge", "--member", "full", *limits, *COMMON])
        servers.update(edge_fail=edge_fail, edge_device=edge_device)
        # a lost verifier shows within 5 s; 20 ms per message on the device->edge link keeps a long stream
        # going long enough to kill its verifier in the middle
        device = [family, "--member", "eesb-0", "serving.timeout_s=5", "serving.edge_link.latency_ms=20", *limits, *WITH_CHAIN]
        fail, dev = start_all([*device, "--remote", f"full={edge_fail.url}", "serving.on_verifier_loss=fail"],
                              [*device, "--remote", f"full={edge_device.url}", "serving.on_verifier_loss=device"])
        servers.update(fail=fail, device=dev)
        yield servers
    finally:
        for server in servers.values():
            stop(server.proc)


def client_of(server: Launched, key: str = KEY) -> OpenAI:
    return OpenAI(base_url=server.base_url, api_key=key, max_retries=0, timeout=60)


def streamed(client: OpenAI, model: str, prompt: str, n: int, received: list[int] | None = None,
             on_first=None) -> tuple[list[int], str, list[dict], str | None]:
    """A streamed completion: the token ids (from each chunk's ``aiflow`` field), the text, the extras, the finish reason."""
    ids = received if received is not None else []
    text, extras, finish = "", [], None
    for chunk in client.completions.create(model=model, prompt=prompt, max_tokens=n, temperature=0, stream=True,
                                           stream_options={"include_usage": True}):
        extra = (chunk.model_extra or {}).get("aiflow")
        if extra:
            ids += extra["token_ids"]
            extras.append(extra)
        if chunk.choices:
            text += chunk.choices[0].text
            finish = chunk.choices[0].finish_reason or finish
        if on_first is not None and ids:
            on_first()
            on_first = None
    return ids, text, extras, finish


def spec_counters(url: str, model: str) -> dict[str, float]:
    """The server's Prometheus speculative-decoding counters of one chain model."""
    out = {}
    for line in httpx.get(url + "/metrics").text.splitlines():
        for name in ("num_drafts", "num_draft_tokens", "num_accepted_tokens"):
            if line.startswith(f"aiflow:spec_decode_{name}_total{{") and f'model="{model}"' in line:
                out[name] = out.get(name, 0.0) + float(line.rsplit(" ", 1)[1])
    return out


def check_chain_extra(extra: dict, tokens: int) -> None:
    """The chain's extra field is present and self-consistent (one device->full link)."""
    assert extra["chain"] == CHAIN and extra["verified"] is True and extra["tiers"] == ["eesb-0", "full"]
    (link,) = extra["links"]
    assert link["link"] == "eesb-0->full" and link["verifier"] == "full"
    assert 0 < link["drafted"] and 0 <= link["accepted"] <= min(link["drafted"], tokens) and link["drafts"] >= 1
    assert link["acceptance_rate"] == round(link["accepted"] / link["drafted"], 4)
    assert link["mean_acceptance_length"] == round(1 + link["accepted"] / link["drafts"], 3)
    # every verification sends its block up and its verdict down
    assert link["bytes_up"] > 0 and link["bytes_down"] > 0
    # each final token was either an accepted draft or the verifier's own (one per verification at most, plus
    # the token after the prompt): the counts cannot explain fewer tokens than were produced
    assert tokens <= link["accepted"] + link["drafts"] + 1


@pytest.mark.timeout(180)
@pytest.mark.parametrize("model,last", [("eesb-0", "eesb-0"), (CHAIN, "full")])
def test_answers_equal_generate_token_for_token(fleet, reference, tokenizer, model, last):
    """A member and a chain, non-streamed and streamed: the ids the server reports are generate()'s of the
    member / of the chain's last tier, the text is their decoding, the finish reason follows EOS."""
    server = fleet["fail"]
    assert fleet["edge_fail"].proc.poll() is None  # (the kill tests below run last)
    client = client_of(server)
    for prompt in PROMPTS[:2]:
        want = reference(last, prompt, 24)
        before = spec_counters(server.url, model)
        solo = client.completions.create(model=model, prompt=prompt, max_tokens=24, temperature=0)
        extra = solo.model_extra["aiflow"]
        assert extra["token_ids"] == want, (model, prompt)
        assert solo.usage.completion_tokens == len(want)
        assert solo.choices[0].text == tokenizer.decode(want, skip_special_tokens=True)
        assert solo.choices[0].finish_reason == ("stop" if want[-1] in reference.eos(last) else "length")
        ids, text, extras, finish = streamed(client, model, prompt, 24)
        assert ids == want and text == solo.choices[0].text and finish == solo.choices[0].finish_reason
        if model == CHAIN:
            check_chain_extra(extra, len(want))
            finals = [e for e in extras if "links" in e]
            assert len(finals) == 1 and finals[0] is extras[-1]  # the statistics ride on the last chunk
            check_chain_extra(finals[0], len(want))
            after = spec_counters(server.url, model)  # /metrics counted exactly what the two responses reported
            for key, field in (("num_drafts", "drafts"), ("num_draft_tokens", "drafted"), ("num_accepted_tokens", "accepted")):
                got = after[key] - before.get(key, 0.0)
                assert got == extra["links"][0][field] + finals[0]["links"][0][field], key
        else:
            assert "links" not in extra and not spec_counters(server.url, model)
    # the chain really checked drafts: over these prompts its early exit was both accepted and rejected
    if model == CHAIN:
        link = extra["links"][0]
        assert 0 < link["accepted"] < link["drafted"]


@pytest.mark.timeout(120)
def test_key_body_limit_fields_and_context_get_json_errors(fleet, tokenizer):
    server = fleet["fail"]
    url, good = server.url, {"model": "eesb-0", "prompt": "Hello", "max_tokens": 2, "temperature": 0}
    auth = {"Authorization": f"Bearer {KEY}"}

    def still_serving() -> None:
        assert httpx.get(url + "/health").status_code == 200
        ok = httpx.post(url + "/v1/completions", json=good, headers=auth, timeout=30)
        assert ok.status_code == 200 and len(ok.json()["aiflow"]["token_ids"]) == 2

    def openai_error(response: httpx.Response, status: int) -> dict:
        assert response.status_code == status, response.text
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["message"]
        return error

    # the key: /v1/* refuse a missing or wrong one (401, authentication_error); /health and /metrics stay open
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        for method, path in (("GET", "/v1/models"), ("POST", "/v1/completions"), ("POST", "/v1/chat/completions")):
            error = openai_error(httpx.request(method, url + path, json=good, headers=headers), 401)
            assert error["type"] == "authentication_error" and "API key" in error["message"]
    with pytest.raises(openai.AuthenticationError):
        client_of(server, key="wrong").models.list()
    assert {m.id for m in client_of(server).models.list().data} == {"eesb-0", CHAIN}
    assert httpx.get(url + "/metrics").status_code == 200
    still_serving()
    # a body over serving.api.max_body_bytes (1 MB): declared, and streamed without a length
    big = b'{"model": "eesb-0", "prompt": "' + b"x" * 1_100_000 + b'"}'
    for content in (big, iter([big[i:i + 65536] for i in range(0, len(big), 65536)])):
        error = openai_error(httpx.post(url + "/v1/completions", content=content, headers={**auth, "content-type": "application/json"}), 413)
        assert "1000000 bytes" in error["message"]
    still_serving()
    # an unknown field: 400 naming it (in the message and as param), through raw HTTP and through the client
    error = openai_error(httpx.post(url + "/v1/completions", json={**good, "frequency_bias": 1}, headers=auth), 400)
    assert error["param"] == "frequency_bias" and "unknown field 'frequency_bias'" in error["message"]
    with pytest.raises(openai.BadRequestError, match="unknown field 'mystery'"):
        client_of(server).chat.completions.create(model="eesb-0", messages=[{"role": "user", "content": "Hi"}], max_tokens=2,
                                                  extra_body={"mystery": True})
    error = openai_error(httpx.post(url + "/v1/chat/completions", headers=auth, json={
        "model": "eesb-0", "messages": [{"role": "user", "content": "Hi", "colour": "red"}]}), 400)
    assert error["param"] == "messages.0.colour"
    still_serving()
    # prompt + max_tokens over the context (128 here): 400 with the numbers, as vLLM words it
    prompt = "one two three four five six seven eight nine ten " * 10
    n = len(tokenizer(prompt)["input_ids"])
    assert n < 128 < n + 60
    for model in ("eesb-0", CHAIN):
        error = openai_error(httpx.post(url + "/v1/completions", headers=auth,
                                        json={"model": model, "prompt": prompt, "max_tokens": 60}), 400)
        assert error["code"] == "context_length_exceeded" and error["param"] == "max_tokens"
        assert (f"maximum context length is 128 tokens. However, you requested {n + 60} tokens "
                f"({n} in the prompt, 60 in the completion)") in error["message"]
    with pytest.raises(openai.BadRequestError, match="maximum context length is 128 tokens"):
        client_of(server).completions.create(model=CHAIN, prompt=prompt * 2, max_tokens=1)
    still_serving()


@pytest.mark.timeout(180)
def test_sessions_evicted_under_load_never_yield_a_wrong_token(fleet, reference):
    """Six chains at once through a verifier tier holding 2 sessions: each answer is generate()'s of the
    last tier, or an explicit error; never a 200 with other tokens."""
    server, edge = fleet["fail"], fleet["edge_fail"]
    assert edge.proc.poll() is None
    before = httpx.get(edge.url + "/tier/info", headers={"Authorization": f"Bearer {KEY}"}).json()
    assert before["max_sessions"] == 2
    client = client_of(server)

    def ask(prompt: str):
        try:
            return client.completions.create(model=CHAIN, prompt=prompt, max_tokens=16, temperature=0)
        except openai.APIStatusError as exc:
            return exc

    with ThreadPoolExecutor(6) as pool:
        answers = list(pool.map(ask, PROMPTS[:6]))
    right = 0
    for prompt, answer in zip(PROMPTS, answers):
        if isinstance(answer, openai.APIStatusError):  # explicit: a 502 naming the lost tier, never a 200
            assert answer.status_code == 502 and "unavailable" in answer.message, answer.message
        else:
            assert answer.model_extra["aiflow"]["token_ids"] == reference("full", prompt, 16), prompt
            assert answer.model_extra["aiflow"]["verified"] is True
            right += 1
    after = httpx.get(edge.url + "/tier/info", headers={"Authorization": f"Bearer {KEY}"}).json()
    resends = sum(a.model_extra["aiflow"]["links"][0]["prefix_resends"] for a in answers
                  if not isinstance(a, openai.APIStatusError))
    assert after["evicted"] > before["evicted"] and resends > 0  # sessions really were evicted and re-sent
    assert right >= 1


def kill_mid_stream(server: Launched, edge: Launched, prompt: str) -> tuple[list[int], int, Exception | None, list, float]:
    """Stream a long chain answer (100 tokens); SIGKILL the verifier process once the first tokens arrived."""
    received: list[int] = []
    at_kill: list[int] = []

    def kill() -> None:
        at_kill.append(len(received))
        os.kill(edge.proc.pid, signal.SIGKILL)
        edge.proc.wait(10)

    start, error, extras = time.monotonic(), None, []
    try:
        _, _, extras, _ = streamed(client_of(server), CHAIN, prompt, 100, received, on_first=kill)
    except openai.APIError as exc:
        error = exc
    return received, at_kill[0], error, extras, time.monotonic() - start


@pytest.mark.timeout(180)
def test_killed_verifier_fail_policy_ends_the_stream_with_an_error(fleet, reference):
    received, at_kill, error, _, seconds = kill_mid_stream(fleet["fail"], fleet["edge_fail"], PROMPTS[6])
    assert isinstance(error, openai.APIError) and "unavailable" in error.message and "on_verifier_loss=fail" in error.message
    assert seconds < 30 and 0 < at_kill <= len(received) < 100
    assert received == reference("full", PROMPTS[6], 100)[:len(received)]  # what came was verified
    with pytest.raises(openai.APIStatusError) as lost:  # later requests: an explicit 502 at once, no hang
        client_of(fleet["fail"]).completions.create(model=CHAIN, prompt=PROMPTS[7], max_tokens=8, temperature=0)
    assert lost.value.status_code == 502
    plain = client_of(fleet["fail"]).completions.create(model="eesb-0", prompt=PROMPTS[7], max_tokens=8, temperature=0)
    assert plain.model_extra["aiflow"]["token_ids"] == reference("eesb-0", PROMPTS[7], 8)  # the device member serves on


@pytest.mark.timeout(180)
def test_killed_verifier_device_policy_ends_device_only_marked_unverified(fleet, reference):
    received, at_kill, error, extras, seconds = kill_mid_stream(fleet["device"], fleet["edge_device"], PROMPTS[6])
    assert error is None and seconds < 30 and at_kill > 0
    final = extras[-1]
    assert final["verified"] is False and final["tiers"] == ["eesb-0"] and any("unavailable" in w for w in final["warnings"])
    want = reference("full", PROMPTS[6], 100)
    if want[-1] not in reference.eos("full"):
        assert len(received) == 100 or received[-1] in reference.eos("eesb-0")  # finished by the device member alone
    assert received[:at_kill] == want[:at_kill]  # what came before the kill was verified
    again = client_of(fleet["device"]).completions.create(model=CHAIN, prompt=PROMPTS[7], max_tokens=8, temperature=0)
    assert again.model_extra["aiflow"]["verified"] is False
    assert again.model_extra["aiflow"]["token_ids"] == reference("eesb-0", PROMPTS[7], 8)  # the device member alone
