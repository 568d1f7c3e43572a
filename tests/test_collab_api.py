"""The collaboration protocol served as the model `collab`: a real `aiflow serve RUN_DIR` process on
loopback, asked through the official openai client; the answers are checked against transformers'
greedy generate() of each saved specialist (its adapter folded in) and of the general member."""
from __future__ import annotations

import json

import httpx
import pytest
import torch
from openai import BadRequestError, OpenAI

from aiflow_fl.serving.api.main import start, stop

QUERY = "How do I catch an exception in Python?"
DESCRIPTIONS = {"edge-0": "Python programming: functions, classes, exceptions, modules and the standard library.",
                "edge-1": "Cooking and recipes: baking bread, boiling pasta, spices, ovens and kitchen tips."}


def _random_adapter(cfg, seed: int) -> dict:
    """Rank-2 random factors on every attention/MLP projection of the member (so specialists differ)."""
    from aiflow_fl.aggregation.update import LoraFactors
    from aiflow_fl.family.member import member_from_config

    member = member_from_config(cfg, "full")
    gen = torch.Generator().manual_seed(seed)
    layers = {}
    for name, module in member.model.named_modules():
        if isinstance(module, torch.nn.Linear) and "lm_head" not in name:
            layers[member.key_of(name)] = LoraFactors(torch.randn(2, module.in_features, generator=gen) * 0.3,
                                                      torch.randn(module.out_features, 2, generator=gen) * 0.3, 1.0)
    return layers


@pytest.fixture(scope="module")
def collab_run(tiny_llama_dir, tmp_path_factory):
    """A run folder as a hierarchical run with collab.save_specialists leaves it (no family/ in it)."""
    from aiflow_fl.collab.specialists import SpecialistInfo, write_specialist
    from aiflow_fl.config import load_config

    run = tmp_path_factory.mktemp("collab-run")
    (run / "config.yaml").write_text(f"model:\n  name: {tiny_llama_dir}\nfamily:\n  dir: /nonexistent\n")
    cfg = load_config([], config_file=run / "config.yaml")
    write_specialist(run / "specialists" / "general", SpecialistInfo("general", "general", "full", "The cloud model."),
                     _random_adapter(cfg, 0))
    for seed, (name, description) in enumerate(DESCRIPTIONS.items(), start=1):
        write_specialist(run / "specialists" / name, SpecialistInfo(name, "specialist", "full", description),
                         _random_adapter(cfg, seed))
    return run


@pytest.fixture(scope="module")
def served(collab_run):
    server = start([str(collab_run), "--threads", "1", "collab.top_k=2", "collab.threshold=-1", "collab.rounds=1",
                    "collab.max_new_tokens=6"], timeout_s=120)
    yield OpenAI(base_url=server.base_url, api_key="unused", max_retries=0), server.url
    stop(server.proc)


def _greedy(run, name: str, messages: list[dict], n: int) -> str:
    from aiflow_fl.collab.agents import chat_prompt_ids
    from aiflow_fl.collab.specialists import load_specialist_model, read_specialist
    from aiflow_fl.config import load_config

    model, tok = load_specialist_model(load_config([], config_file=run / "config.yaml"), read_specialist(run / "specialists" / name))
    ids = torch.tensor([chat_prompt_ids(tok, messages)])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                         pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
    return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()


def test_collab_model_answers_with_the_synthesis_and_reports_routing(served, collab_run):
    from aiflow_fl.collab.prompts import aggregator_messages, revision_messages

    client, url = served
    listed = {m.id: m for m in client.models.list().data}
    assert set(listed) == {"collab"} and listed["collab"].model_extra["aiflow"]["kind"] == "collab"
    reply = client.chat.completions.create(model="collab", messages=[{"role": "system", "content": "Be brief."},
                                                                    {"role": "user", "content": QUERY}], temperature=0)
    info = reply.model_extra["aiflow"]["collab"]
    routing = info["routing"]
    assert set(routing["scores"]) == set(DESCRIPTIONS) and routing["selected"][0] == "edge-0"  # the Python specialist first
    assert routing["scores"]["edge-0"] > routing["scores"]["edge-1"] and sorted(routing["selected"]) == sorted(DESCRIPTIONS)
    assert sum(routing["weights"][n] for n in routing["selected"]) == pytest.approx(1.0)
    assert list(info["answers"]) == routing["selected"] and not info["dropped"] and set(info["revisions"]) == set(DESCRIPTIONS)
    user = [{"role": "user", "content": QUERY}]
    for name, answer in info["answers"].items():  # each agent's answer is its own greedy generate()
        assert answer == _greedy(collab_run, name, user, 6)
        assert info["agents"][name]["new_tokens"] >= 1 and info["agents"][name]["bytes_up"] > 0
    # the message is the general member's Mixture-of-Agents synthesis of exactly those answers
    synthesis = _greedy(collab_run, "general", aggregator_messages(QUERY, list(info["answers"].items())), 6)
    assert reply.choices[0].message.content == info["answer"] == synthesis
    assert info["revisions"]["edge-1"] == _greedy(collab_run, "edge-1", revision_messages(QUERY, info["answers"]["edge-1"], synthesis), 6)
    assert {"route", "fan-out", "synthesis", "revision-1", "total"} <= set(info["timings_s"])
    assert info["bytes"]["server->device"] > 0 and reply.usage.completion_tokens <= 6
    # streaming: the same synthesis, the summary on the finishing chunk; max_tokens shortens every step
    chunks = list(client.chat.completions.create(model="collab", messages=user, stream=True, max_tokens=3))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == _greedy(
        collab_run, "general", aggregator_messages(QUERY, [(n, _greedy(collab_run, n, user, 3)) for n in routing["selected"]]), 3)
    assert chunks[-1].model_extra["aiflow"]["collab"]["routing"]["selected"] == routing["selected"]
    # what the greedy protocol cannot honour is refused, naming the field; the server goes on
    for bad, field in [(dict(temperature=0.8), "temperature"), (dict(stop=["x"]), "stop")]:
        with pytest.raises(BadRequestError, match=field):
            client.chat.completions.create(model="collab", messages=user, **bad)
    with pytest.raises(BadRequestError, match="empty"):
        client.chat.completions.create(model="collab", messages=[{"role": "user", "content": "  "}])
    with pytest.raises(BadRequestError, match="max_query_chars"):
        client.chat.completions.create(model="collab", messages=[{"role": "user", "content": "why? " * 900}])
    with pytest.raises(BadRequestError, match="last user message"):
        client.chat.completions.create(model="collab", messages=[{"role": "system", "content": "hi"}])
    wrong = httpx.post(url + "/v1/completions", json={"model": "collab", "prompt": "x"})
    assert wrong.status_code == 400 and "chat" in json.dumps(wrong.json())
    assert httpx.get(url + "/health").json() == {"status": "ok", "models": ["collab"]}
