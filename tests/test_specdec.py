"""Hierarchical speculative decoding: acceptance rules and in-process chains against transformers' own generate."""

from __future__ import annotations

import math

import pytest
import torch
from scipy.stats import chisquare

from aiflow_fl.errors import AiflowError
from aiflow_fl.models import tiny_model
from aiflow_fl.serving.acceptance import (
    best_draft_len,
    draft_speed,
    expected_accepted,
    expected_tokens_per_round,
    required_acceptance,
    tokens_per_round,
    verify_costs,
    greedy_accept,
    next_draft_len,
    residual_distribution,
    speculative_accept,
)
from aiflow_fl.serving.build import local_chain
from aiflow_fl.serving.link import Link
from aiflow_fl.family.member import early_exit_member, early_exit_members


def scrambled(arch: str, layers: int = 6, vocab: int = 512, std: float = 0.08, seed: int = 1, embed_std: float = 0.02):
    """A tiny model whose early exits disagree with the full model often (random weights of a larger
    scale), so chains see both acceptances and rejections; ``embed_std`` sharpens its distributions."""
    model = tiny_model(arch, num_layers=layers, vocab_size=vocab, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.model.layers.parameters():
            if p.dim() == 2:
                p.copy_(torch.randn(p.shape, generator=gen) * std)
        model.model.embed_tokens.weight.mul_(embed_std / 0.02)
    return model


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models gain nothing from more threads, and on a shared, loaded machine one is fastest."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def chi2_pvalue(counts: torch.Tensor, probs: torch.Tensor, min_expected: float = 5.0) -> float:
    """Chi-square goodness of fit; categories with small expected counts are pooled into one."""
    n = counts.sum().item()
    expected = probs.double() * n
    big = expected >= min_expected
    obs = torch.cat([counts[big].double(), counts[~big].double().sum().view(1)])
    exp = torch.cat([expected[big], expected[~big].sum().view(1)])
    keep = exp > 0
    return float(chisquare(obs[keep].numpy(), exp[keep].numpy() * obs[keep].sum().item() / exp[keep].sum().item()).pvalue)


# ---------------------------------------------------------------------------------------------- rules


def test_greedy_accept_is_longest_matching_prefix():
    assert greedy_accept(torch.tensor([5, 6, 7]), torch.tensor([5, 6, 9, 1])) == (2, 9)
    assert greedy_accept(torch.tensor([5, 6, 7]), torch.tensor([5, 6, 7, 1])) == (3, 1)  # bonus
    assert greedy_accept(torch.tensor([5, 6, 7]), torch.tensor([5, 6, 7])) == (3, None)
    assert greedy_accept(torch.tensor([5]), torch.tensor([4])) == (0, 4)
    with pytest.raises(AiflowError, match="need n or n\\+1"):
        greedy_accept(torch.tensor([1, 2]), torch.tensor([1]))


def test_residual_is_normalized_positive_part():
    p, q = torch.tensor([0.5, 0.3, 0.2]), torch.tensor([0.2, 0.6, 0.2])
    torch.testing.assert_close(residual_distribution(p, q), torch.tensor([1.0, 0.0, 0.0]))
    torch.testing.assert_close(residual_distribution(p, p), p)


@pytest.mark.parametrize("support", ["full", "reduced"])
def test_speculative_sampling_outputs_the_verifier_distribution(support):
    """One draft token x ~ q, then the rule: the output token is distributed as p (chi-square),
    although q is far from p — and even when q is zero outside a reduced draft vocabulary."""
    gen = torch.Generator().manual_seed(0)
    p = torch.tensor([0.05, 0.4, 0.1, 0.3, 0.15])
    q = torch.tensor([0.4, 0.1, 0.3, 0.1, 0.1]) if support == "full" else torch.tensor([0.5, 0.0, 0.5, 0.0, 0.0])
    n = 12000
    counts = torch.zeros(5)
    rejected = 0
    for _ in range(n):
        x = torch.multinomial(q, 1, generator=gen)
        accepted, token = speculative_accept(x, q[None], p[None], gen)
        out = int(x) if accepted == 1 else token
        rejected += accepted == 0
        counts[out] += 1
    assert chi2_pvalue(counts, p) > 1e-3
    assert chi2_pvalue(counts, q) < 1e-6  # the test has power: the draft's distribution is rejected
    # acceptance probability of the rule is sum_x min(p, q)
    assert abs(1 - rejected / n - torch.minimum(p, q).sum().item()) < 0.02


def test_bonus_and_block_rejection_positions():
    gen = torch.Generator().manual_seed(0)
    one_hot = torch.eye(4)
    # the verifier puts all mass on the draft tokens: everything accepted, bonus from row n
    accepted, token = speculative_accept(torch.tensor([1, 2]), one_hot[[1, 2]] * 0.5 + 0.125, one_hot[[1, 2, 3]], gen)
    assert (accepted, token) == (2, 3)
    # second token impossible for the verifier: rejected there, replacement from the residual
    accepted, token = speculative_accept(torch.tensor([1, 2]), torch.full((2, 4), 0.25), one_hot[[1, 0]], gen)
    assert (accepted, token) == (1, 0)


def test_draft_length_schedule_and_expected_tokens():
    assert next_draft_len(4, 4, 4, 1, 8) == 6 and next_draft_len(4, 1, 4, 1, 8) == 3
    assert next_draft_len(8, 8, 8, 1, 8) == 8 and next_draft_len(1, 0, 1, 1, 8) == 1
    assert expected_tokens_per_round(0.0, 4) == 1.0 and expected_tokens_per_round(1.0, 4) == 5.0
    assert abs(expected_tokens_per_round(0.5, 2) - 1.75) < 1e-12


# ---------------------------------------------------------------------------------------------- chains


def reference(model, ids: torch.Tensor, n: int) -> list[int]:
    with torch.inference_mode():
        out = model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False)
    return out[0, ids.shape[1]:].tolist()


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_greedy_chains_equal_transformers_generate_of_last_verifier(arch):
    """Every chain (2 and 3 tiers; familial reuse on/off; sequential/pipelined; several draft
    lengths and prompts) outputs token for token what generate() of its last verifier does."""
    model = scrambled(arch)
    members = early_exit_members(model, [2, 4])
    chains = {"device-cloud": [members[0], members[2]], "device-edge": [members[0], members[1]], "3-tier": members}
    rejections = 0
    for seed, prompt_len in [(0, 5), (1, 11)]:
        ids = torch.randint(3, 500, (1, prompt_len), generator=torch.Generator().manual_seed(seed))
        expected = {"device-cloud": reference(model, ids, 20), "3-tier": None}
        expected["3-tier"] = expected["device-cloud"]
        expected["device-edge"] = reference(members[1].model, ids, 20)
        for name, tiers in chains.items():
            for reuse, pipelined, draft_len in [(True, False, 1 + 2 * seed), (False, False, 2), (True, True, 4 - seed)]:
                chain = local_chain(tiers, reuse=reuse, draft_len=draft_len, pipelined=pipelined, eos_token_ids=[], blocks=[1, 4][: len(tiers) - 1])
                result = chain.generate(ids, 20)
                assert result.tokens == expected[name], (name, reuse, pipelined, draft_len)
                stats = result.stats["tiers"][1]
                rejections += stats["drafted"] - stats["accepted"]
                assert stats["entry_layer"] == (tiers[0].exit_layer if reuse else 0)
    assert rejections > 30  # the drafts really were wrong often: the correction path is exercised


def test_adaptive_draft_and_reduced_vocab_stay_lossless_and_stream():
    model = tiny_model("llama", num_layers=6)  # default scale: drafts mostly right, so the draft grows
    members = early_exit_members(model, [3])
    ids = torch.randint(3, 1000, (1, 8), generator=torch.Generator().manual_seed(3))
    expected = reference(model, ids, 30)
    streamed: list[int] = []
    chain = local_chain(members, draft_vocab=300, draft_len=2, adaptive=True, max_draft=10, eos_token_ids=[])
    result = chain.generate(ids, 30, on_tokens=streamed.extend)
    assert result.tokens == expected and streamed[:30] == expected
    assert chain.draft_len != 2  # adapted
    assert chain.slots[0].tier.vocab is not None and len(chain.slots[0].tier.vocab) == 300
    gated = local_chain(members, draft_len=4, confidence=0.5, eos_token_ids=[])
    assert gated.generate(ids, 30).tokens == expected  # confidence-gated drafting stays lossless
    calls = {tau: local_chain(members, draft_len=4, confidence=tau, eos_token_ids=[]).generate(ids, 30).stats["tiers"][1]["calls"]
             for tau in (0.0, 1.01)}
    assert calls[1.01] > calls[0.0]  # a threshold above any probability ends every block after one token


def test_eos_stops_like_generate():
    model = scrambled("llama", vocab=64, std=0.05, seed=4)
    members = early_exit_members(model, [2])
    ids = torch.randint(3, 60, (1, 6), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        free = model.generate(ids, max_new_tokens=40, do_sample=False)[0, 6:].tolist()
    eos = free[7]  # pretend a token the model emits is the end of sequence
    model.generation_config.eos_token_id = eos
    with torch.inference_mode():
        expected = model.generate(ids, max_new_tokens=40, do_sample=False, eos_token_id=eos, pad_token_id=0)[0, 6:].tolist()
    result = local_chain(members, draft_len=3, eos_token_ids=[eos]).generate(ids, 40)
    assert result.tokens == expected[: expected.index(eos) + 1]


def test_familial_reuse_skips_the_shared_layers():
    """With reuse the verifier runs only layers [exit, L): its cache holds nothing below the exit;
    without reuse it recomputes them from token ids."""
    model = scrambled("qwen2")
    members = early_exit_members(model, [4])
    ids = torch.randint(3, 500, (1, 9), generator=torch.Generator().manual_seed(0))
    for reuse in (True, False):
        chain = local_chain(members, reuse=reuse, draft_len=3, eos_token_ids=[])
        chain.generate(ids, 12)
        verifier_cache = chain.slots[1].tier.cache
        filled = [i for i, layer in enumerate(verifier_cache.layers) if layer.is_initialized]
        assert filled == (list(range(4, 6)) if reuse else list(range(0, 6)))


def test_links_count_hidden_states_vs_token_ids():
    model = scrambled("llama")
    members = early_exit_members(model, [2])
    ids = torch.randint(3, 500, (1, 7), generator=torch.Generator().manual_seed(0))
    up = {}
    for reuse in (True, False):
        link = Link("device-edge", latency_ms=1.0)
        chain = local_chain(members, reuse=reuse, draft_len=3, links=[link], eos_token_ids=[])
        result = chain.generate(ids, 10)
        assert link.messages == 2 * result.stats["tiers"][1]["calls"]
        assert link.delay_s >= 0.001 * link.messages
        up[reuse] = link.bytes_up
    # hidden states: H floats per position; token ids: one int32 per position
    assert up[True] > up[False] * model.config.hidden_size / 2


def test_sampling_chain_matches_the_verifier_distribution():
    """Tokens 1 and 2 of a sampled 2-tier and 3-tier chain follow the last verifier's distribution
    (chi-square vs the exact marginals computed from the verifier), not the draft's."""
    torch.manual_seed(0)
    model = scrambled("llama", layers=4, vocab=48, std=0.1, seed=7, embed_std=0.2)
    members = early_exit_members(model, [1, 2])
    ids = torch.tensor([[5, 17, 3, 40]])
    temperature = 1.0
    with torch.inference_mode():
        p1 = torch.softmax(model(ids).logits[0, -1] / temperature, -1)
        both = torch.cat([ids.repeat(48, 1), torch.arange(48).view(48, 1)], 1)
        p2 = (p1.view(48, 1) * torch.softmax(model(both).logits[:, -1] / temperature, -1)).sum(0)
        q1 = torch.softmax(members[0].model(ids).logits[0, -1] / temperature, -1)
    runs = 500
    for tiers in ([members[0], members[2]], members):
        chain = local_chain(tiers, draft_len=3, temperature=temperature, eos_token_ids=[], seed=11, blocks=[1, 2][: len(tiers) - 1])
        first, second = torch.zeros(48), torch.zeros(48)
        accepted = drafted = 0
        for _ in range(runs):
            result = chain.generate(ids, 2)
            first[result.tokens[0]] += 1
            second[result.tokens[1]] += 1
            accepted += result.stats["tiers"][1]["accepted"]
            drafted += result.stats["tiers"][1]["drafted"]
        assert chi2_pvalue(first, p1) > 1e-3 and chi2_pvalue(second, p2) > 1e-3
        assert chi2_pvalue(first, q1) < 1e-6  # power: the draft's own distribution is rejected
        assert 0 < accepted < drafted  # both branches of the rule ran


def test_early_exit_member_shares_weights_and_bad_exits_raise():
    model = tiny_model("llama", num_layers=4)
    small = early_exit_member(model, "exit-2").model
    assert small.config.num_hidden_layers == 2 and small.model.layers[1] is model.model.layers[1]
    assert small.lm_head is model.lm_head
    with pytest.raises(AiflowError, match="outside 1..4"):
        early_exit_member(model, "exit-5")
    with pytest.raises(AiflowError, match="strictly increasing"):
        early_exit_members(model, [3, 2])
    with pytest.raises(AiflowError, match="1 to 3"):
        local_chain([early_exit_member(model, "full")] * 4)


def test_family_members_chain_equals_generate_of_the_full_member(tmp_path, tokenizer):
    """Real EESB members from a family folder (branch layers, whitened SVD): device -> edge -> full,
    with and without familial reuse, equals generate() of the full member; default member choice."""
    from aiflow_fl.config import FamilyConfig, load_config
    from aiflow_fl.family.family import family_from_backbone
    from aiflow_fl.family.member import load_family_member
    from aiflow_fl.serving.api.chains import ChainRunner
    from aiflow_fl.serving.commands import build_chain

    model = scrambled("llama", std=0.05)  # 512-id vocabulary; the tokenizer is only stored, never used
    batches = [torch.randint(3, 500, (2, 24), generator=torch.Generator().manual_seed(i)) for i in range(2)]
    family = family_from_backbone(model, tokenizer, FamilyConfig(kind="eesb", exits=[2, 4], ratios=[0.5, 0.5]), batches=batches)
    folder = family.save(tmp_path / "family")
    full = load_family_member(folder, "full").model
    ids = torch.randint(3, 500, (1, 8), generator=torch.Generator().manual_seed(9))
    for reuse, cost_aware in [(True, False), (False, False), (True, True)]:
        cfg = load_config([f"serving.reuse={reuse}", f"serving.cost_aware={cost_aware}", "serving.draft_len=3", "serving.cloud_block=3"])
        chain, _ = build_chain(cfg, ["device", "edge", "cloud"], family=str(folder))
        assert [s.tier.name for s in chain.slots] == ["eesb-0", "eesb-1", "full"]
        # cost-aware (the default): the last tier reads token ids, so it can decode alone
        expected = [0, 2, 0] if cost_aware else [0, 2, 4] if reuse else [0, 0, 0]
        assert [s.tier.entry for s in chain.slots] == expected
        assert chain.generate(ids, 16).tokens == reference(full, ids, 16)
        # the API's chain model (aiflow serve) builds its chains the same way (it had let the cloud resume
        # from the edge's hidden states, so a cost-aware chain could never decode alone: 0.76x the cloud)
        members = [load_family_member(folder, n) for n in ("eesb-0", "eesb-1", "full")]
        served = ChainRunner("eesb-0>eesb-1>full", members, cfg.serving, [], pool=None, metrics=None).chain(0.0, 0)
        assert [s.tier.entry for s in served.slots] == expected and served.cost_aware == cost_aware
        assert served.generate(ids, 16).tokens == reference(full, ids, 16)


# ---------------------------------------------------------------------------------------------- cost-aware drafting


def test_expected_tokens_per_round_match_a_simulation():
    """The closed forms against Monte Carlo rounds of i.i.d. acceptance (accept each draft token with
    probability α until the first rejection; +1 token for the correction, or the bonus if any)."""
    gen = torch.Generator().manual_seed(0)
    for alpha, k in [(0.3, 4), (0.8, 5), (0.6, 1)]:
        hits = torch.rand(200_000, k, generator=gen) < alpha
        accepted = hits.int().cumprod(1).sum(1).double()
        with_bonus = accepted + 1
        without = torch.where(accepted == k, accepted, accepted + 1)  # reuse: no bonus after a full accept
        for got, sample in [(expected_accepted(alpha, k), accepted), (tokens_per_round(alpha, k), with_bonus),
                            (tokens_per_round(alpha, k, bonus=False), without)]:
            assert abs(got - sample.mean().item()) < 4 * sample.std().item() / 200_000 ** 0.5 + 1e-9
        assert expected_accepted(alpha, k) == pytest.approx(sum(alpha ** i for i in range(1, k + 1)))
        assert tokens_per_round(alpha, k) == pytest.approx(expected_tokens_per_round(alpha, k))
    assert expected_accepted(1.0, 3) == 3.0 and tokens_per_round(1.0, 3, bonus=False) == 3.0
    with pytest.raises(AiflowError):
        expected_accepted(1.5, 2)


def test_best_draft_len_maximises_expected_speed():
    flat = [0.0] + [0.050] * 8  # overhead-dominated verifier: V(k) ≈ V(1)
    for alpha, draft_s in [(0.9, 0.005), (0.5, 0.005), (0.2, 0.02), (0.05, 0.04)]:
        k, speed = best_draft_len(alpha, draft_s, flat, 0.045)
        brute = max(range(9), key=lambda j: draft_speed(alpha, j, draft_s, flat, 0.045))
        assert k == brute and speed == pytest.approx(draft_speed(alpha, brute, draft_s, flat, 0.045))
    assert best_draft_len(0.9, 0.005, flat, 0.045)[0] == 8  # cheap, good drafts: draft long
    assert best_draft_len(0.05, 0.04, flat, 0.045)[0] == 0  # bad, costly drafts: the verifier alone
    assert best_draft_len(0.05, 0.04, flat, 0.045, lowest=1)[0] == 1
    assert 0 < best_draft_len(0.5, 0.005, [0.0] + [0.03 + 0.01 * k for k in range(1, 9)], 0.045)[0] < 8  # growing V(k)


def test_required_acceptance_is_where_the_speedup_is_reached():
    verify = [0.0] + [0.05 + 0.002 * k for k in range(1, 9)]
    alpha = required_acceptance(2.0, 0.004, verify, 0.044)
    assert alpha is not None and 0 < alpha < 1
    reached = lambda a: max(draft_speed(a, k, 0.004, verify, 0.044) for k in range(1, 9)) * 0.044  # noqa: E731
    assert reached(alpha) == pytest.approx(2.0, rel=1e-6) and reached(alpha - 0.01) < 2.0
    assert required_acceptance(2.0, 0.03, verify, 0.044) is None  # even perfect drafts are too slow
    assert required_acceptance(2.0, 0.004, verify, 0.044, bonus=False) > alpha  # no bonus token: needs more


def test_verify_costs_fit_a_line():
    costs = verify_costs([(1, 0.012), (3, 0.016), (5, 0.020), (3, 0.016)], 6)
    assert costs[0] == 0.0 and costs[1:] == pytest.approx([0.010 + 0.002 * k for k in range(1, 7)])
    assert verify_costs([(2, 0.03), (2, 0.05)], 3)[1:] == pytest.approx([0.04] * 3)  # one length seen: flat
    with pytest.raises(AiflowError):
        verify_costs([], 3)


def test_cost_aware_chains_are_lossless_and_decode_alone_when_drafts_do_not_pay():
    """Bad drafts (scrambled weights) from token ids: a cost-aware chain starts with the verifier alone,
    probes drafting for a short window, measures that it loses and goes back to the verifier alone
    (probing again later, less often); the output stays generate()'s throughout."""
    model = scrambled("llama")
    members = early_exit_members(model, [3, 4])
    for seed in (0, 1):
        ids = torch.randint(3, 500, (1, 6 + seed), generator=torch.Generator().manual_seed(seed))
        expected = reference(model, ids, 40)
        chain = local_chain([members[0], members[2]], reuse=False, draft_len=3, eos_token_ids=[], cost_aware=True, probe_every=4, probe_budget=1.0)
        assert chain.generate(ids, 40).tokens == expected
        log = chain.policy_log
        assert log[0] == 3 and 0 in log and chain.preferred_mode == 0  # probed drafting, measured it losing, went back
        assert chain.probe_gap > 1  # and probes less often since
        stats = chain.stats()
        assert stats["preferred"] == "last tier alone" and all(v > 0 for v in stats["measured_tokens_per_s"].values())
        for reuse, tiers in [(True, [members[0], members[2]]), (True, members), (False, members)]:
            other = local_chain(tiers, reuse=reuse, draft_len=2, eos_token_ids=[], cost_aware=True, probe_every=3, probe_budget=1.0,
                                blocks=[1, 3][: len(tiers) - 1])
            assert other.generate(ids, 40).tokens == expected, (reuse, len(tiers))
            assert other.slots[-1].tier.entry == 0  # the last tier reads token ids: it can decode alone
            assert 2 in other.policy_log and other.preferred_mode == 0  # and it does: these drafts do not pay
    with pytest.raises(AiflowError, match="cost_aware"):
        local_chain(members[:2], cost_aware=True, pipelined=True)


def test_a_losing_probe_is_cut_short_and_later_probes_fit_the_probe_budget():
    """The cost-aware policy's two bounds on probing, from the chain's own measured state: a drafting
    probe that has run as long as the verifier alone needs for the whole probe, with fewer tokens
    finalised, is behind (ended at the next step, not when the cloud next finalises a block); and after
    a lost probe the gap is at least twice the last one and long enough that the time lost is at most
    PROBE_BUDGET of the decoding time (window time = probe_every / the preferred mode's speed)."""
    from aiflow_fl.serving.chain import MAX_PROBE_GAP, PROBE_BUDGET

    model = scrambled("llama")
    members = early_exit_members(model, [3, 4])
    chain = local_chain(members, reuse=False, draft_len=2, eos_token_ids=[], cost_aware=True, probe_every=16, blocks=[1, 4])
    chain.mode_rates = [[100.0, 1.0], [0.0, 0.0]]  # alone: 100 tokens/s
    chain.mode, chain.preferred_mode, chain.window_mode = 1, 0, 0  # a drafting probe that has finalised nothing yet
    assert chain._probe_len() == 8  # 3 tiers: half a window
    # the first probe waits until a probe lost after 8 tokens' time costs ≤ 2 % of the decoding: 25 windows
    assert chain.probe_gap == math.ceil(8 / (PROBE_BUDGET * 16)) == 25
    assert not chain._probe_behind(0.05)  # alone would have made 5 < 8 tokens: too early to judge
    assert chain._probe_behind(0.09)  # 9 tokens' time and none finalised: behind
    chain.window_mode, chain.window_tokens, chain.window_s = 1, 12, 0.08
    assert not chain._probe_behind(0.02)  # 12 finalised in 0.10 s: as fast as alone (10), not behind
    chain.probe_gap = 1
    # a probe that made 2 tokens in 0.5 s lost 0.48 s; a window alone takes 0.16 s
    gap = chain._gap_after_loss(2, 0.5, 100.0)
    assert gap == math.ceil(0.48 / (PROBE_BUDGET * 0.16)) and gap * PROBE_BUDGET * 0.16 >= 0.48 - 1e-9
    chain.probe_gap = 8
    assert chain._gap_after_loss(15, 0.16, 100.0) == 16  # barely lost: the gap doubles
    assert chain._gap_after_loss(0, 100.0, 100.0) == MAX_PROBE_GAP


def test_cost_aware_chains_switch_to_drafting_when_it_pays():
    """A cheap draft that is always right (layers after the first pass the residual stream through:
    their output projections are zero, so exit 1 predicts exactly the full model's tokens) and a
    verifier of many layers: the measured probe wins, the chain keeps drafting across generate()
    calls, and the output is generate()'s."""
    model = tiny_model("llama", num_layers=12, vocab_size=512, seed=3)
    with torch.no_grad():
        for layer in model.model.layers[1:]:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
    device, full = early_exit_members(model, [1])
    ids = torch.randint(3, 500, (1, 7), generator=torch.Generator().manual_seed(0))
    expected = reference(model, ids, 48)
    chain = local_chain([device, full], reuse=False, draft_len=4, max_draft=8, eos_token_ids=[], cost_aware=True, probe_every=8, probe_budget=1.0)
    assert chain.generate(ids, 48).tokens == expected
    assert chain.preferred_mode == 1 and chain.stats()["preferred"] == "drafting"
    second = chain.generate(ids, 48)  # a second call starts drafting at once (probing the verifier alone now and then)
    assert second.tokens == expected and second.stats["tiers"][1]["accepted"] >= 24 and chain.preferred_mode == 1


def test_confidence_gated_three_tier_chains_never_stall():
    """Regression: a cloud rejection after a doubted draft token left the gate closed with nothing to
    verify ("no progress"). Strict gates, 3 tiers, pipelined and sequential, short and long outputs."""
    model = scrambled("llama")
    members = early_exit_members(model, [2, 4])
    for seed in range(3):
        ids = torch.randint(3, 500, (1, 5 + seed), generator=torch.Generator().manual_seed(seed))
        expected = reference(model, ids, 12)
        for pipelined in (True, False):
            for n in (4, 12):
                chain = local_chain(members, draft_len=3, adaptive=True, confidence=0.9, pipelined=pipelined,
                                    blocks=[1, 6], eos_token_ids=[])
                assert chain.generate(ids, n).tokens == expected[:n], (seed, pipelined, n)


def test_stats_describe_one_generate_call_not_the_sum_of_all():
    """Regression: accepted/drafted/calls/bytes kept adding up across generate() calls. The same
    prompt twice must report the same counts, equal to a fresh chain's."""
    model = scrambled("llama")
    members = early_exit_members(model, [3])
    ids = torch.randint(3, 500, (1, 7), generator=torch.Generator().manual_seed(5))
    chain = local_chain(members, draft_len=3, eos_token_ids=[])
    first = chain.generate(ids, 16).stats["tiers"][1]
    second = chain.generate(ids, 16).stats["tiers"][1]
    fresh = local_chain(members, draft_len=3, eos_token_ids=[]).generate(ids, 16).stats["tiers"][1]
    for key in ("accepted", "drafted", "calls", "bytes_up", "bytes_down", "messages", "mean_accepted_len"):
        assert first[key] == second[key] == fresh[key], key
    assert first["drafted"] > 0 and first["calls"] > 0
