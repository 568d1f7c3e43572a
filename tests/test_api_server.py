"""A real `aiflow serve` process on loopback, asked through the official openai client (issue #12)."""
from __future__ import annotations

import threading

import pytest
import torch
from openai import OpenAI
from transformers import AutoModelForCausalLM

from aiflow_fl.serving.api.main import start, stop


@pytest.fixture(scope="module")
def served(tiny_llama_dir):
    server = start(["--model", str(tiny_llama_dir)], timeout_s=120)
    yield OpenAI(base_url=server.base_url, api_key="unused", max_retries=0), server.url
    stop(server.proc)


def _reference(tiny_llama_dir, tokenizer, prompt: str, n: int) -> list[int]:
    """transformers' greedy generate() of the same weights: the independent reference."""
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    ids = torch.tensor([tokenizer(prompt)["input_ids"]])
    out = model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
    return out[0, ids.shape[1]:].tolist()


def test_member_answers_equal_generate_streamed_and_not_and_concurrently(served, tiny_llama_dir, tokenizer):
    client, _ = served
    prompts = [f"Question {i}: what is {i} plus {i}?" for i in range(8)]
    expected = [tokenizer.decode(_reference(tiny_llama_dir, tokenizer, p, 12)) for p in prompts]
    solo = client.completions.create(model="full", prompt=prompts[0], max_tokens=12, temperature=0)
    assert solo.usage.completion_tokens <= 12
    assert expected[0].startswith(solo.choices[0].text)
    stream = client.completions.create(model="full", prompt=prompts[0], max_tokens=12, temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in stream if c.choices) == solo.choices[0].text
    answers: list[str | None] = [None] * 8

    def ask(i: int) -> None:
        answers[i] = client.completions.create(model="full", prompt=prompts[i], max_tokens=12, temperature=0).choices[0].text

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    for got, want in zip(answers, expected):
        assert got is not None and want.startswith(got) and len(got) > 0


def test_bad_inputs_get_json_errors_and_server_keeps_serving(served):
    import httpx

    _, url = served
    assert httpx.post(url + "/v1/completions", json={"model": "nope", "prompt": "x"}).status_code == 404
    bad = httpx.post(url + "/v1/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert bad.status_code in (400, 422) and "error" in bad.json()
    wrong = httpx.post(url + "/v1/completions", json={"model": "full", "prompt": "x", "max_tokens": "many"})
    assert wrong.status_code in (400, 422) and "max_tokens" in wrong.text
    long = httpx.post(url + "/v1/completions", json={"model": "full", "prompt": "x", "max_tokens": 10_000_000})
    assert long.status_code == 400 and "error" in long.json()
    assert httpx.get(url + "/health").status_code == 200
    ok = httpx.post(url + "/v1/completions", json={"model": "full", "prompt": "x", "max_tokens": 2, "temperature": 0})
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] >= 1
