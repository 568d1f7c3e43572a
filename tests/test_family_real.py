"""One check on the real embedded SmolLM2-135M: eq. 3 on real text, shared features, split inference."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.slow


def test_real_model_eesb_member_eq3_and_split():
    from aiflow_fl.config import FamilyConfig
    from aiflow_fl.family import family_from_backbone
    from aiflow_fl.family.batches import calibration_batches
    from aiflow_fl.family.split import resume, run_prefix
    from aiflow_fl.family.svd import factorize
    from aiflow_fl.models import load_backbone

    loaded = load_backbone()
    model, tok = loaded.model, loaded.tokenizer
    batches = calibration_batches(tok, samples=2, seq_len=64, batch_size=2)
    family = family_from_backbone(model, tok, FamilyConfig(kind="eesb", exits=[12], ratios=[0.5]), batches=batches)
    spec = family.spec("eesb-0")
    assert 0.4 < spec.block_parameters / family.spec("full").block_parameters < 0.45
    # eq. 3 on the real inputs of layer 12's q_proj
    linear = model.model.layers[12].self_attn.q_proj
    seen = []
    handle = linear.register_forward_hook(lambda m, a, o: seen.append(a[0].reshape(-1, a[0].shape[-1]).double()))
    with torch.no_grad():
        for b in batches:
            model(input_ids=b, use_cache=False)
        handle.remove()
        x = torch.cat(seen)
        from aiflow_fl.family.svd import calibrate

        gram = calibrate(model, batches, layers=[12])["model.layers.12.self_attn.q_proj"]
        fac = factorize(linear.weight, gram)
        w_u, w_v = fac.factors(100, torch.float64)
        w = linear.weight.double()
        measured = float(((w - w_u @ w_v) @ x.T).pow(2).sum())
        assert abs(measured - fac.dropped_energy(100)) < 1e-3 * fac.dropped_energy(100)
        # the member's first 12 layers are the backbone's; split at 12 then resume on the full model
        member = family.build("eesb-0")
        ids = batches[0][:1, :24]
        reference = model(ids).logits
        logits, _ = resume(model, run_prefix(member, ids, 12, spec=spec), spec=family.spec("full"))
        torch.testing.assert_close(logits, reference, atol=1e-4, rtol=1e-4)
        assert torch.isfinite(member(ids, labels=ids).loss)
