"""Branch and HPCD training on a fixed batch: what moves, what stays frozen, and the loss goes down."""

from __future__ import annotations

import itertools
import random

import pytest
import torch

from aiflow_fl.config import BranchTrainingConfig, FamilyConfig
from aiflow_fl.errors import AiflowError
from aiflow_fl.family import family_from_backbone
from aiflow_fl.family.evaluate import evaluate_lm
from aiflow_fl.family.train import pick_subset, train_branches, train_hpcd
from aiflow_fl.models import tiny_model


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def setup():
    model = tiny_model("llama", num_layers=3, vocab_size=512)
    torch.manual_seed(0)
    batch = torch.randint(0, 300, (2, 24))
    cfg = FamilyConfig(kind="both", exits=[1, 1], ratios=[0.3, 0.6], hpcd_components=2, hpcd_ratio=0.2)
    return model, batch, cfg


def _snapshot(family):
    return {k: v.clone() for k, v in family.tensors.items()}


def test_frozen_main_trains_only_branches_and_loss_drops(setup):
    model, batch, cfg = setup
    family = family_from_backbone(model, None, cfg, batches=[batch])
    before = _snapshot(family)
    ce_before = evaluate_lm(family.build("eesb-1"), [batch])["ppl"]
    tcfg = BranchTrainingConfig(steps=8, lr=3e-3, main="frozen", kl_weight=0.5)
    history = train_branches(family, itertools.repeat(batch), tcfg, show_progress=False)
    assert set(history) == {"eesb-0", "eesb-1", "main", "steps_done"} and len(history["eesb-0"]) == 8
    changed = {k for k in before if not torch.equal(before[k], family.tensors[k])}
    assert changed and all(k.startswith("branch.1.") for k in changed)
    assert evaluate_lm(family.build("eesb-1"), [batch])["ppl"] < ce_before
    # the partial member (eesb-0) trains a prefix of the same factors
    assert history["eesb-0"][-1] < history["eesb-0"][0]


def test_lora_main_is_merged_into_the_backbone(setup):
    model, batch, cfg = setup
    family = family_from_backbone(model, None, cfg, batches=[batch])
    before = _snapshot(family)
    train_branches(family, itertools.repeat(batch), BranchTrainingConfig(steps=3, lr=1e-2, main="lora"), show_progress=False)
    changed = {k for k in before if not torch.equal(before[k], family.tensors[k])}
    assert any(k.startswith("model.layers.") and k.endswith("proj.weight") for k in changed)
    assert "model.embed_tokens.weight" not in changed
    assert not any("lora" in k for k in family.tensors)


def test_accumulated_sequential_subsets_train_every_branch_in_one_step(setup):
    model, batch, cfg = setup
    family = family_from_backbone(model, None, cfg, batches=[batch])
    tcfg = BranchTrainingConfig(steps=1, subset="sequential", subset_size=1, accumulate=2)
    history = train_branches(family, itertools.repeat(batch), tcfg, show_progress=False)
    assert len(history["eesb-0"]) == 1 and len(history["eesb-1"]) == 1


def test_subset_strategies():
    rng = random.Random(0)
    assert pick_subset("all", 4, 1, 0, [1] * 4, rng) == [0, 1, 2, 3]
    assert [pick_subset("sequential", 4, 1, s, [1] * 4, rng) for s in range(5)] == [[0], [1], [2], [3], [0]]
    assert len(pick_subset("random", 4, 2, 0, [1] * 4, rng)) == 2
    counts = [0, 0, 0]
    for s in range(300):
        for i in pick_subset("loss_adaptive", 3, 1, s, [0.1, 0.1, 5.0], rng):
            counts[i] += 1
    assert counts[2] > 200
    with pytest.raises(AiflowError, match="loss_adaptive"):
        pick_subset("worst", 3, 1, 0, [1] * 3, rng)


def test_hpcd_progressive_training_freezes_earlier_components(setup):
    from aiflow_fl.family.svd import calibrate, factorize

    model, batch, cfg = setup
    family = family_from_backbone(model, None, cfg, batches=[batch])
    grams = calibrate(model, [batch])
    before = _snapshot(family)
    history = train_hpcd(family, itertools.repeat(batch), steps=2, lr=1e-2, show_progress=False, stages=[1])
    assert set(history) == {"hpcd-1"} and history["hpcd-1"][1] < history["hpcd-1"][0] + 1.0
    changed = {k for k in before if not torch.equal(before[k], family.tensors[k])}
    assert changed and all(k.startswith("hpcd.") and k.endswith(".0") for k in changed)  # only component 0
    after_stage1 = _snapshot(family)
    # stage 2: component 1 is re-initialised from the residual of the *trained* component 0, then trained
    train_hpcd(family, itertools.repeat(batch), steps=0, grams=grams, show_progress=False, stages=[2])
    path = "model.layers.1.mlp.down_proj"
    w = family.tensors[f"{path}.weight"].double()
    residual = w - after_stage1[f"hpcd.{path}.us.0"].double() @ after_stage1[f"hpcd.{path}.vs.0"].double()
    u, v = factorize(residual, grams[path]).factors(family.hpcd_ranks[path][1], torch.float64)
    torch.testing.assert_close(family.tensors[f"hpcd.{path}.us.1"].double() @ family.tensors[f"hpcd.{path}.vs.1"].double(),
                               u @ v, atol=1e-5, rtol=1e-4)
    train_hpcd(family, itertools.repeat(batch), steps=2, lr=1e-2, show_progress=False, stages=[2])
    for key, value in after_stage1.items():
        if key.endswith(".0"):
            assert torch.equal(family.tensors[key], value)  # earlier component frozen in stage 2
    assert any(not torch.equal(family.tensors[k], after_stage1[k]) for k in after_stage1 if k.endswith(".1"))
    with pytest.raises(AiflowError, match="1..2"):
        train_hpcd(family, itertools.repeat(batch), steps=1, stages=[3])
