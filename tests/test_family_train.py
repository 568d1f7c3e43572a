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
    tcfg = BranchTrainingConfig(steps=15, lr=3e-3, main="frozen", kl_weight=0.5)
    history = train_branches(family, itertools.repeat(batch), tcfg, show_progress=False)
    assert set(history) == {"eesb-0", "eesb-1", "main", "steps_done"} and len(history["eesb-0"]) == 15
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
    model, batch, cfg = setup
    family = family_from_backbone(model, None, cfg, batches=[batch])
    before = _snapshot(family)
    history = train_hpcd(family, itertools.repeat(batch), steps=1, lr=1e-2, show_progress=False)
    assert set(history) == {"hpcd-1", "hpcd-2"}
    changed = {k for k in before if not torch.equal(before[k], family.tensors[k])}
    assert changed and all(k.startswith("hpcd.") for k in changed)
    # stage 2 left component 0 as stage 1 trained it: retrain stage 1 state and compare its last value
    comp0 = {k: family.tensors[k].clone() for k in family.tensors if k.endswith(".us.0")}
    family2 = family_from_backbone(model, None, cfg, batches=[batch])
    train_hpcd(family2, itertools.repeat(batch), steps=1, lr=1e-2, show_progress=False)
    for k, v in comp0.items():
        torch.testing.assert_close(family2.tensors[k], v)  # deterministic, and stage 2 did not touch it
