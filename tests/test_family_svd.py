"""Whitened SVD: eq. 3 on real calibration inputs, rank choice, DecomposedLinear under real peft."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model

from aiflow_fl.errors import AiflowError
from aiflow_fl.family.svd import (
    DecomposedLinear,
    calibrate,
    decompose_linear,
    factorize,
    rank_for_ratio,
    ranks_for_budget,
    residual_components,
)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def tiny(request):
    from aiflow_fl.models import tiny_model

    return tiny_model(request.param, num_layers=3, vocab_size=512)


def _inputs_of(model, linear, batches):
    """The real inputs X of one linear over the calibration batches (captured independently)."""
    captured = []
    handle = linear.register_forward_hook(lambda m, a, o: captured.append(a[0].detach().reshape(-1, a[0].shape[-1])))
    with torch.no_grad():
        for b in batches:
            model(input_ids=b, use_cache=False)
    handle.remove()
    return torch.cat(captured).double()


def test_eq3_whitened_loss_equals_dropped_singular_values(tiny):
    torch.manual_seed(0)
    batches = [torch.randint(0, 500, (2, 48)) for _ in range(3)]
    grams = calibrate(tiny, batches, layers=[1])
    assert set(grams) == {f"model.layers.1.{n}" for n in
                          ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]}
    # q/k/v read one tensor: one shared Gram matrix; o_proj reads another.
    assert grams["model.layers.1.self_attn.q_proj"] is grams["model.layers.1.self_attn.v_proj"]
    assert grams["model.layers.1.self_attn.q_proj"] is not grams["model.layers.1.self_attn.o_proj"]
    for name in ["self_attn.q_proj", "mlp.down_proj"]:
        linear = tiny.get_submodule(f"model.layers.1.{name}")
        x = _inputs_of(tiny, linear, batches)  # (N, in)
        torch.testing.assert_close(x.T @ x, grams[f"model.layers.1.{name}"])
        fac = factorize(linear.weight, grams[f"model.layers.1.{name}"])
        w = linear.weight.detach().double()
        for rank in (1, 5, 17):
            w_u, w_v = fac.factors(rank, torch.float64)
            measured = float(((w - w_u @ w_v) @ x.T).pow(2).sum())
            predicted = fac.dropped_energy(rank)
            assert abs(measured - predicted) <= 1e-6 * (w @ x.T).pow(2).sum()
            # whitening minimises the output error: plain SVD at the same rank does worse
            p_u, p_v = factorize(linear.weight, None).factors(rank, torch.float64)
            assert float(((w - p_u @ p_v) @ x.T).pow(2).sum()) >= measured * (1 - 1e-9)


def test_cholesky_jitter_on_rank_deficient_gram():
    torch.manual_seed(0)
    x = torch.randn(10, 3).double() @ torch.randn(3, 8).double()  # rank 3 inputs, 8 features
    w = torch.randn(6, 8)
    fac = factorize(w, x.T @ x)
    assert torch.isfinite(fac.sigma).all() and torch.isfinite(fac.vt_sinv).all()
    w_u, w_v = fac.factors(3, torch.float64)
    # rank 3 captures the whole output on rank-3 inputs
    assert float(((w.double() - w_u @ w_v) @ x.T).pow(2).sum()) < 1e-6 * float((w.double() @ x.T).pow(2).sum())


def test_rank_for_ratio_and_errors():
    assert rank_for_ratio(576, 576, 1.0) == 288
    assert rank_for_ratio(1536, 576, 0.5) == int(0.5 * 1536 * 576 / (1536 + 576))
    assert rank_for_ratio(10, 10, 1e-6) == 1
    for bad in (0.0, -0.1, 1.5):
        with pytest.raises(AiflowError, match=r"\(0, 1\]"):
            rank_for_ratio(8, 8, bad)


def test_ranks_for_budget_follow_the_spectrum():
    spectra = {"a": (torch.tensor([10.0, 9.0, 8.0, 7.0]), 4, 4), "b": (torch.tensor([1.0, 0.5, 0.1, 0.01]), 4, 4)}
    ranks = ranks_for_budget(spectra, budget=5 * 8)
    assert ranks == {"a": 4, "b": 1}
    assert sum(r * 8 for r in ranks.values()) <= 40
    with pytest.raises(AiflowError, match="minimum"):
        ranks_for_budget(spectra, budget=10)


def test_hpcd_components_sum_to_the_weight_and_partial_rank():
    torch.manual_seed(0)
    w = torch.randn(12, 9)
    x = torch.randn(50, 9)
    comps = residual_components(w, x.T.double() @ x.double(), rank=3, count=3)
    layer = DecomposedLinear.from_factors([u for u, _ in comps], [v for _, v in comps])
    assert layer.rank == 9
    torch.testing.assert_close(layer.weight, w, atol=1e-4, rtol=1e-4)  # full rank: exact
    errors = []
    for k in (1, 2, 3):
        layer.active_rank = 3 * k
        errors.append(float((x @ (w - layer.weight).T).pow(2).sum()))
    assert errors[0] > errors[1] > errors[2]


def test_decomposed_linear_under_real_peft_and_merge_is_refused():
    from aiflow_fl.models import tiny_model

    tiny = tiny_model("qwen2", num_layers=2, vocab_size=512)
    linear = tiny.model.layers[0].self_attn.q_proj
    grams = calibrate(tiny, [torch.randint(0, 500, (1, 32))], layers=[0])
    dec = decompose_linear(linear, grams["model.layers.0.self_attn.q_proj"], rank=8)
    tiny.model.layers[0].self_attn.q_proj = dec
    ids = torch.randint(0, 500, (1, 10))
    with torch.no_grad():
        before = tiny(ids).logits
    peft_model = get_peft_model(tiny, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    wrapped = peft_model.base_model.model.model.layers[0].self_attn.q_proj
    assert wrapped.base_layer is dec
    x = torch.randn(3, dec.in_features)
    # LoRA adds its own delta (peft's get_delta_weight) to the low-rank output
    with torch.no_grad():
        torch.testing.assert_close(wrapped(x), dec(x) + x @ wrapped.get_delta_weight("default").T)
        assert not torch.allclose(peft_model(ids).logits, before)
    with pytest.raises(AiflowError, match="merge"):
        peft_model.merge_and_unload()


def test_residual_components_equal_explicit_refactorization_of_the_residual():
    torch.manual_seed(0)
    w, x = torch.randn(20, 12), torch.randn(40, 12).double()
    gram = x.T @ x
    comps = residual_components(w, gram, rank=3, count=3)
    residual = w.double()
    for c in range(3):
        u, v = factorize(residual, gram).factors(3, torch.float64)
        torch.testing.assert_close(comps[c][0].double() @ comps[c][1].double(), u @ v, atol=1e-5, rtol=1e-5)
        residual = residual - u @ v
    with pytest.raises(AiflowError, match="at most 4"):
        residual_components(w, gram, rank=3, count=5)


def test_decomposed_linear_copies_and_pickles_after_weight_was_read():
    import copy
    import io

    layer = DecomposedLinear.from_factors([torch.randn(5, 2)], [torch.randn(2, 4)])
    dense = layer.weight.clone()  # fills the cache
    twin = copy.deepcopy(layer)
    torch.testing.assert_close(twin.weight, dense)
    buffer = io.BytesIO()
    torch.save(layer, buffer)
    buffer.seek(0)
    torch.testing.assert_close(torch.load(buffer, weights_only=False).weight, dense)
    with torch.no_grad():
        twin.us[0].mul_(2)  # an in-place update of a factor invalidates the cached product
    torch.testing.assert_close(twin.weight, 2 * dense)
