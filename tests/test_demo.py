"""The demo's own pieces: serving the federation's trained weights (fold_run_update) and the family cache key."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from aiflow_fl.aggregation.update import AdapterUpdate, LoraFactors
from aiflow_fl.errors import AiflowError
from aiflow_fl.family.member import early_exit_member
from aiflow_fl.federated.run import RunFolder, fold_run_update
from aiflow_fl.protocol import update_to_arrays


def test_fold_run_update_adds_the_newest_checkpoints_delta(tmp_path, tiny):
    """The newest checkpoint's base + adapter, B @ A · scaling summed, lands in the weight (hand sum)."""
    member = early_exit_member(tiny, "full")
    path = next(p for p, m in member.model.named_modules() if p.endswith("layers.1.self_attn.q_proj"))
    key = member.key_of(path)
    weight = member.model.get_submodule(path).weight.detach().clone()
    g = torch.Generator().manual_seed(0)
    out_f, in_f = weight.shape

    def factors(rank: int, scaling: float) -> LoraFactors:
        return LoraFactors(torch.randn(rank, in_f, generator=g), torch.randn(out_f, rank, generator=g), scaling)

    base, adapter, stale = factors(4, 0.5), factors(2, 2.0), factors(2, 9.0)
    run = RunFolder(tmp_path)

    def arrays(prefix: str, f: LoraFactors) -> dict[str, np.ndarray]:
        record = update_to_arrays(AdapterUpdate({key: f}, 1))
        return {f"{prefix}{k}": record[k].numpy() for k in record.keys()}

    run.save_checkpoint(1, arrays("", stale), {})  # older round: must not be folded
    run.save_checkpoint(2, {**arrays("base/", base), **arrays("adapter/", adapter)}, {})
    assert fold_run_update([member], tmp_path) == 2
    expected = weight + 0.5 * base.B @ base.A + 2.0 * adapter.B @ adapter.A
    torch.testing.assert_close(member.model.get_submodule(path).weight.detach(), expected, rtol=1e-5, atol=1e-5)


def test_fold_run_update_without_a_checkpoint_is_a_clear_error(tmp_path, tiny):
    with pytest.raises(AiflowError, match="no readable checkpoint"):
        fold_run_update([early_exit_member(tiny, "full")], tmp_path)


def test_family_cache_key_follows_what_the_family_is_built_from():
    from aiflow_fl.config import load_config
    from aiflow_fl.demo import family_cache_key

    cfg = load_config(["recipe=demo"])
    moved = dataclasses.replace(cfg, family=dataclasses.replace(cfg.family, dir="/elsewhere"))
    assert family_cache_key(moved) == family_cache_key(cfg)  # where it goes is not what it is
    steps = dataclasses.replace(cfg.family.branch_training, steps=cfg.family.branch_training.steps + 1)
    for other in (dataclasses.replace(cfg, family=dataclasses.replace(cfg.family, branch_training=steps)),
                  dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, source="stdlib")),
                  dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, seed=1))):
        assert family_cache_key(other) != family_cache_key(cfg)


def test_gain_beyond_noise_compares_the_change_with_the_intervals_half_width():
    from aiflow_fl.demo import gains_beyond_noise

    figures = {"heldout_acc_delta/eesb-0": 0.0166, "heldout_acc_delta_ci95/eesb-0": [0.0097, 0.0236],  # half 0.00695
               "heldout_acc_delta/eesb-1": 0.004, "heldout_acc_delta_ci95/eesb-1": [-0.002, 0.011],  # half 0.0065
               "heldout_acc_delta": 0.01, "heldout_acc_delta_ci95": [0.0, 0.02]}
    assert gains_beyond_noise(figures) == {"eesb-0": True, "eesb-1": False}
