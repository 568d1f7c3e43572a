"""Aggregation math against independent references: the equation Σ p_k s_k B_k A_k, dense SVD,
peft's own ``merge_and_unload``, and flat-vs-hierarchical composition."""

from __future__ import annotations

import itertools

import pytest
import torch

from aiflow_fl.aggregation import EXACT_METHODS, METHODS, AdapterUpdate, LoraFactors, hierarchical, lowrank
from aiflow_fl.aggregation.common import aligned
from aiflow_fl.aggregation.update import to_peft_state_dict

M, N = 20, 12  # out, in features of every test module
KEYS = ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"]


def make_updates(seed: int = 0, ranks=(2, 4, 8, 4), examples=(10, 30, 5, 20), alphas=(16.0, 16.0, 8.0, 4.0), shallow: int | None = 0):
    """Heterogeneous ranks, alphas and example counts; device ``shallow`` lacks layer 1 (a shallow member)."""
    gen = torch.Generator().manual_seed(seed)
    updates = []
    for i, (r, n, a) in enumerate(zip(ranks, examples, alphas)):
        keys = KEYS[:1] if i == shallow else KEYS
        layers = {k: LoraFactors(torch.randn(r, N, generator=gen), torch.randn(M, r, generator=gen), a / r) for k in keys}
        updates.append(AdapterUpdate(layers, n, member=f"d{i}"))
    return updates


def reference(updates: list[AdapterUpdate]) -> dict[str, torch.Tensor]:
    """Σ_k p_k s_k B_k A_k per key, p_k renormalised over the updates that have the key (float64)."""
    out = {}
    for key in {k for u in updates for k in u.layers}:
        have = [u for u in updates if key in u.layers]
        total = sum(u.num_examples for u in have)
        out[key] = sum(u.num_examples / total * u.layers[key].delta().double() for u in have)
    return out


def max_error(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert set(a) == set(b)
    return max(float((a[k] - b[k]).abs().max()) for k in a)


@pytest.mark.parametrize("name", EXACT_METHODS)
def test_exact_methods_reproduce_weighted_sum_of_products(name: str) -> None:
    updates = make_updates()
    agg = METHODS[name](updates)
    ref = reference(updates)
    assert max_error(lowrank.dense(agg.merged()), ref) < 1e-4
    # every client, whatever its rank, starts the next round from exactly that model
    for rank, alpha in [(2, 16.0), (4, 16.0), (8, 8.0)]:
        extra, lora = agg.for_rank(rank, alpha / rank)
        assert all(f.rank == rank for f in lora.values()) or agg.reinit_lora
        start = lowrank.dense(lowrank.add([agg.base, extra, lora]))
        assert max_error(start, ref) < 1e-4


def test_fedit_is_not_exact_and_equals_mean_of_factors() -> None:
    updates = make_updates(ranks=(4, 4, 4, 4), alphas=(8.0,) * 4, shallow=None)
    agg = METHODS["fedit"](updates)
    p = torch.tensor([u.num_examples for u in updates], dtype=torch.float64)
    p = p / p.sum()
    key = KEYS[0]
    A_bar = sum(pk * u.layers[key].A.double() for pk, u in zip(p, updates))
    B_bar = sum(pk * u.layers[key].scaling * u.layers[key].B.double() for pk, u in zip(p, updates))
    assert torch.allclose(lowrank.dense(agg.merged())[key], B_bar @ A_bar, atol=1e-4)
    error = max_error(lowrank.dense(agg.merged()), reference(updates))
    assert error > 1.0, f"FedIT should miss the cross terms here, error {error}"


@pytest.mark.parametrize("name", EXACT_METHODS)
def test_hierarchical_equals_flat_for_exact_methods(name: str) -> None:
    updates = make_updates(seed=1)
    flat = lowrank.dense(METHODS[name](updates).merged())
    groupings = [[[0, 1], [2, 3]], [[0], [1, 2, 3]], [[3, 0], [2], [1]], [[0, 1, 2, 3]]]
    for grouping in groupings:
        hier = hierarchical([[updates[i] for i in g] for g in grouping], METHODS[name], edge_rank=None)
        assert max_error(lowrank.dense(hier.merged()), flat) < 1e-4, grouping


@pytest.mark.parametrize("name", ["fedit", "hetlora"])
def test_hierarchical_differs_from_flat_for_factor_averaging(name: str) -> None:
    updates = make_updates(seed=1)
    flat = lowrank.dense(METHODS[name](updates).merged())
    hier = hierarchical([updates[:2], updates[2:]], METHODS[name], edge_rank=None)
    assert max_error(lowrank.dense(hier.merged()), flat) > 0.1


def test_edge_rank_truncation_is_the_best_low_rank_approximation() -> None:
    updates = make_updates(seed=2, shallow=None)
    pairs = [lowrank.scaled(u.layers[KEYS[0]], 1.0) for u in updates]
    dense = sum(b @ a for b, a in pairs)
    for rank in (1, 3, 6):
        f = lowrank.refactor(pairs, max_rank=rank)
        U, S, Vh = torch.linalg.svd(dense)
        best = (U[:, :rank] * S[:rank]) @ Vh[:rank]
        assert f.rank == rank
        assert torch.allclose(f.delta().double(), best, atol=1e-4)


def test_layer_alignment_shallow_member_changes_only_its_layers() -> None:
    updates = make_updates(seed=3, shallow=0)
    base = METHODS["flexlora"](updates)
    # move the shallow member's update a lot: only the layer it has may change
    moved = [AdapterUpdate({k: LoraFactors(f.A * 5, f.B, f.scaling) for k, f in u.layers.items()}, u.num_examples) if i == 0 else u for i, u in enumerate(updates)]
    after = METHODS["flexlora"](moved)
    before_d, after_d = lowrank.dense(base.merged()), lowrank.dense(after.merged())
    assert torch.allclose(before_d[KEYS[1]], after_d[KEYS[1]], atol=1e-5)
    assert not torch.allclose(before_d[KEYS[0]], after_d[KEYS[0]], atol=1e-2)
    # weights renormalised over the members that have the key
    groups = aligned(updates)
    assert groups[KEYS[1]].weights == pytest.approx([30 / 55, 5 / 55, 20 / 55])
    assert groups[KEYS[0]].num_examples == 65


def test_for_rank_restricts_keys_for_a_shallow_node() -> None:
    agg = METHODS["fedexlora"](make_updates(seed=4))
    extra, lora = agg.for_rank(4, 4.0, keys={KEYS[0]})
    assert set(lora) == {KEYS[0]} and set(extra) <= {KEYS[0]}


def test_ffa_keeps_a_shared_and_is_exact() -> None:
    gen = torch.Generator().manual_seed(5)
    shared = torch.randn(8, N, generator=gen)
    updates = [AdapterUpdate({KEYS[0]: LoraFactors(shared[:r].clone(), torch.randn(M, r, generator=gen), 2.0)}, n) for r, n in [(2, 3), (8, 5), (4, 9)]]
    agg = METHODS["ffa"](updates)
    assert not agg.base, "with a shared A nothing needs folding"
    assert torch.equal(agg.adapter[KEYS[0]].A, shared)
    assert max_error(lowrank.dense(agg.merged()), reference(updates)) < 1e-4
    _, lora = agg.for_rank(4, 2.0)
    assert torch.equal(lora[KEYS[0]].A, shared[:4])


def test_fedexlora_is_exact_with_the_lora_scaling_and_example_weights() -> None:
    """FedEx-LoRA's merge is Σ p_k s_k B_k A_k: weighted by examples *and* scaled by each client's α/r.
    The rule an outside check found in FedLLM-Factory (weighted, but residual and means from the raw
    products B_k A_k) is far from it when the clients' α/r differ; an unweighted one is too."""
    updates = make_updates(seed=6, examples=(1, 100, 1, 1), alphas=(16.0, 2.0, 8.0, 32.0), shallow=None)
    agg = METHODS["fedexlora"](updates)
    ref = reference(updates)
    assert max_error(lowrank.dense(agg.merged()), ref) < 1e-4
    weights = [u.num_examples / sum(v.num_examples for v in updates) for u in updates]
    # without α/r: B̄Ā + (Σ p_k B_k A_k − B̄Ā) = Σ p_k B_k A_k
    unscaled = {k: sum(w * (u.layers[k].B.double() @ u.layers[k].A.double()) for w, u in zip(weights, updates)) for k in agg.adapter}
    assert max_error(unscaled, ref) > 1.0
    unweighted = {k: sum(u.layers[k].delta().double() for u in updates) / len(updates) for k in agg.adapter}
    assert max_error(unweighted, ref) > 1.0


def test_swapped_or_rank_mismatched_factors_are_refused_naming_key_and_shapes() -> None:
    gen = torch.Generator().manual_seed(11)
    A, B = torch.randn(4, N, generator=gen), torch.randn(M, 4, generator=gen)
    with pytest.raises(ValueError, match=r"rank.*A\(4, 12\).*B\(20, 3\)"):
        LoraFactors(A, B[:, :3], 1.0)  # ranks disagree
    with pytest.raises(ValueError, match=r"rank.*A\(20, 4\).*B\(4, 12\)"):
        LoraFactors(B, A, 1.0)  # swapped on a non-square module: the ranks disagree too
    # swapped on a square module: the ranks agree, but the pair is no LoRA update of that module
    Aq, Bq = torch.randn(2, 8, generator=gen), torch.randn(8, 2, generator=gen)
    good = AdapterUpdate({KEYS[0]: LoraFactors(Aq, Bq, 1.0)}, 5)
    swapped = AdapterUpdate({KEYS[0]: LoraFactors(Bq, Aq, 1.0)}, 5)
    with pytest.raises(ValueError, match=rf"'{KEYS[0]}'.*A\(8, 2\) B\(2, 8\).*swapped"):
        swapped.check_shapes()
    with pytest.raises(ValueError, match=rf"'{KEYS[0]}'.*\(2, 2\) update.*module is \(8, 8\)"):
        swapped.check_shapes({KEYS[0]: (8, 8)})
    good.check_shapes({KEYS[0]: (8, 8)})
    for name in ("fedit", "ffa"):  # mixed with a good update, the aggregation names the key and both shapes
        with pytest.raises(ValueError, match=rf"key '{KEYS[0]}' has shape \(2, 2\).*\(8, 8\)"):
            METHODS[name]([good, swapped])


def test_robust_median_resists_an_outlier() -> None:
    honest = make_updates(seed=7, ranks=(4,) * 5, examples=(10,) * 5, alphas=(4.0,) * 5, shallow=None)
    attacker = AdapterUpdate({k: LoraFactors(f.A, f.B * 1e4, f.scaling) for k, f in honest[0].layers.items()}, 10_000)
    ref = reference(honest)
    for name in ("median", "trimmed_mean"):
        robust = lowrank.dense(METHODS[name](honest + [attacker]).merged())
        mean = lowrank.dense(METHODS["fedavg"](honest + [attacker]).merged())
        assert max_error(robust, ref) < 0.05 * max_error(mean, ref), name


def test_hetlora_weights_follow_update_norms() -> None:
    small, big = make_updates(seed=8, ranks=(4, 4), examples=(10, 10), alphas=(4.0, 4.0), shallow=None)
    big = AdapterUpdate({k: LoraFactors(f.A, f.B * 10, f.scaling) for k, f in big.layers.items()}, 10)
    agg = METHODS["hetlora"]([small, big])
    # the larger update dominates the padded mean of B more than its example share (1/2) would give
    B = agg.adapter[KEYS[0]].B.double()
    share_big = float((B * big.layers[KEYS[0]].B.double()).sum() / (big.layers[KEYS[0]].B.double() ** 2).sum())
    assert share_big > 0.8


def test_merged_adapter_in_peft_matches_dense_result() -> None:
    """Load the aggregate (base folded, then the rank-r LoRA) into real peft and merge with peft's own
    ``merge_and_unload``: the weights equal W0 + the aggregation's dense result."""
    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict

    from aiflow_fl.models import tiny_model

    def model():
        return tiny_model("llama", num_layers=2, hidden_size=32, vocab_size=64, seed=0)

    W0 = {k: model().get_submodule(k).weight.detach().double().clone() for k in ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"]}
    gen = torch.Generator().manual_seed(9)
    updates = []
    for i, (r, n, alpha) in enumerate([(2, 10, 4.0), (4, 20, 16.0), (8, 15, 8.0)]):
        keys = list(W0)[:1] if i == 0 else list(W0)
        updates.append(AdapterUpdate({k: LoraFactors(torch.randn(r, 32, generator=gen) * 0.1, torch.randn(32, r, generator=gen) * 0.1, alpha / r) for k in keys}, n))
    ref = reference(updates)

    def merge_with_peft(net, layers, rank, alpha):
        config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=["q_proj"])
        peft_model = get_peft_model(net, config)
        result = set_peft_model_state_dict(peft_model, to_peft_state_dict(AdapterUpdate(layers, 0), alpha))
        assert not result.unexpected_keys
        return peft_model.merge_and_unload()

    for name in ("fedexlora", "flexlora"):
        agg = METHODS[name](updates)
        rank, alpha = 4, 8.0
        extra, lora = agg.for_rank(rank, alpha / rank)
        base = lowrank.add([agg.base, extra])
        net = model()
        if base:  # the base as a second LoRA of its own rank (padded), merged first
            r_base = max(f.rank for f in base.values())
            padded = {k: LoraFactors(*reversed(lowrank.pad_rank(f, r_base)), 1.0) for k, f in base.items()}
            net = merge_with_peft(net, {k: LoraFactors(f.A.float(), f.B.float(), 1.0) for k, f in padded.items()}, r_base, float(r_base))
        net = merge_with_peft(net, lora, rank, alpha)
        for key, w0 in W0.items():
            merged = net.get_submodule(key).weight.detach().double()
            assert torch.allclose(merged - w0, ref[key], atol=1e-5), (name, key)


def test_bad_inputs_raise() -> None:
    with pytest.raises(ValueError, match="shape"):
        aligned(
            [
                AdapterUpdate({"k": LoraFactors(torch.zeros(2, 3), torch.zeros(4, 2), 1.0)}, 1),
                AdapterUpdate({"k": LoraFactors(torch.zeros(2, 5), torch.zeros(4, 2), 1.0)}, 1),
            ]
        )
    with pytest.raises(ValueError, match="no updates"):
        aligned([])
    with pytest.raises(ValueError, match="zero examples"):
        aligned([AdapterUpdate({"k": LoraFactors(torch.zeros(2, 3), torch.zeros(4, 2), 1.0)}, 0)])


def test_all_groupings_of_three_compose_for_flora() -> None:
    updates = make_updates(seed=10)[:3]
    flat = lowrank.dense(METHODS["flora"](updates).merged())
    for cut in itertools.permutations(range(3)):
        groups = [[updates[cut[0]]], [updates[cut[1]], updates[cut[2]]]]
        assert max_error(lowrank.dense(hierarchical(groups, METHODS["flora"]).merged()), flat) < 1e-4
