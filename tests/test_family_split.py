"""Split inference: a small member's exit state resumed by a larger member equals one full forward."""

from __future__ import annotations

import pytest
import torch

from aiflow_fl.config import FamilyConfig
from aiflow_fl.errors import AiflowError
from aiflow_fl.family import family_from_backbone
from aiflow_fl.family.split import resume, run_prefix


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def tiny(request):
    from aiflow_fl.models import tiny_model

    return tiny_model(request.param, num_layers=4, vocab_size=512)


@pytest.fixture(scope="module")
def family(tiny):
    cfg = FamilyConfig(kind="eesb", exits=[1, 2], ratios=[0.5, 0.5])
    return family_from_backbone(tiny, None, cfg, batches=[torch.randint(0, 500, (2, 16))])


def test_resume_from_small_member_equals_one_full_forward_without_recomputation(tiny, family):
    small, full = family.build("eesb-1"), family.build("full")  # eesb-1: exit 2
    ids = torch.randint(0, 500, (2, 10))
    calls = {i: 0 for i in range(4)}
    handles = [layer.register_forward_hook(lambda m, a, o, i=i: calls.__setitem__(i, calls[i] + 1))
               for i, layer in enumerate(full.model.layers)]
    with torch.no_grad():
        reference = tiny(ids).logits
        state = run_prefix(small, ids[:, :7], 2, spec=family.spec("eesb-1"))
        logits, cache = resume(full, state, spec=family.spec("full"))
        assert calls == {0: 0, 1: 0, 2: 1, 3: 1}  # shared layers are not recomputed
        torch.testing.assert_close(logits, reference[:, :7], atol=1e-5, rtol=1e-5)
        # the resumed cache continues decoding exactly like one full forward
        step = full(ids[:, 7:], cache=cache).logits
        torch.testing.assert_close(step, reference[:, 7:], atol=1e-5, rtol=1e-5)
    for h in handles:
        h.remove()
    # hidden (B=2, T=7, H=64) + 2 layers × (K, V) × (B=2, kv heads=2, T=7, head dim=16), float32
    assert state.num_bytes() == 4 * (2 * 7 * 64 + 2 * 2 * 2 * 2 * 7 * 16)


def test_split_continues_a_prefix_cache_and_exit_zero(tiny, family):
    small, full = family.build("eesb-0"), family.build("full")
    ids = torch.randint(0, 500, (1, 9))
    with torch.no_grad():
        reference = tiny(ids).logits
        # two splits of one sequence: the device keeps its cache, the receiver keeps its own
        from transformers import DynamicCache

        device_cache = DynamicCache(config=small.config)
        first = run_prefix(small, ids[:, :5], 1, cache=device_cache)
        logits_a, server_cache = resume(full, first)
        state = run_prefix(small, ids[:, 5:], 1, cache=device_cache)
        assert state.start == 5 and state.keys_values[0][0].shape[2] == 4  # only the new positions travel
        logits_b, _ = resume(full, state, cache=server_cache)
        torch.testing.assert_close(torch.cat([logits_a, logits_b], 1), reference, atol=1e-5, rtol=1e-5)
        with pytest.raises(AiflowError, match="position 5"):
            resume(full, state)  # a fresh receiver lacks positions 0..4
        logits0, _ = resume(full, run_prefix(small, ids, 0))
        torch.testing.assert_close(logits0, reference, atol=1e-5, rtol=1e-5)


def test_split_past_the_shared_layers_is_refused(family):
    small, full = family.build("eesb-0"), family.build("full")
    ids = torch.randint(0, 500, (1, 4))
    with pytest.raises(AiflowError, match="0..1"):
        run_prefix(small, ids, 2, spec=family.spec("eesb-0"))  # layer 1 is its branch, not shared
    with pytest.raises(AiflowError, match="0..1"):
        resume(small, run_prefix(full, ids, 2), spec=family.spec("eesb-0"))
    with pytest.raises(AiflowError, match="0..1"):
        resume(small, run_prefix(full, ids, 2))  # the receiver has only 2 layers


def test_running_layers_uses_the_current_cache_api(tiny):
    """No "`past_key_values` is deprecated … use `cache`" FutureWarning from aiflow_fl.layers."""
    import warnings

    from transformers import DynamicCache

    from aiflow_fl.layers import embed, positions, run_layers

    ids = torch.randint(0, 500, (1, 6))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run_layers(tiny, embed(tiny, ids), 0, 2, positions(0, 6), DynamicCache(config=tiny.config))
    assert not [w for w in caught if "past_key_values" in str(w.message)]
