"""Device side of federated fine-tuning: members, LoRA conversion, local loop, state, run folder."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from peft import get_peft_model_state_dict

from aiflow_fl.aggregation.update import AdapterUpdate, LoraFactors
from aiflow_fl.config import load_config
from aiflow_fl.data import TokenChunks
from aiflow_fl.errors import AiflowError
from aiflow_fl.federated.device import device_profile
from aiflow_fl.federated.local import (
    default_optimizer,
    evaluate,
    optimizer_state_arrays,
    restore_optimizer_state,
    round_batches,
    train_local,
)
from aiflow_fl.family.member import Member, early_exit_member, exit_layers
from aiflow_fl.federated.lora import attach_lora, extract_update, load_update
from aiflow_fl.federated.run import RunFolder
from aiflow_fl.layers import embed, head, positions, run_layers
from aiflow_fl.models import tiny_model


def _member(model) -> Member:
    return early_exit_member(model, "full")  # the whole tiny model; its keys are its module paths


def _randomize_lora(peft_model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)


def test_early_exit_member_equals_the_backbone_run_to_layer_k(tiny):
    ids = torch.randint(0, 1000, (1, 10))
    with torch.no_grad():
        reference = head(tiny, run_layers(tiny, embed(tiny, ids), 0, 2, positions(0, 10)))
        member = early_exit_member(copy.deepcopy(tiny), "exit-2").model
        torch.testing.assert_close(member(ids).logits, reference, atol=1e-5, rtol=1e-5)
    assert exit_layers("eesb-1", 30, [0.35, 0.6]) == 18 and exit_layers("exit-3", 30, []) == 3
    with pytest.raises(AiflowError, match="eesb-i"):
        exit_layers("big", 30, [0.5])


def test_extracted_update_equals_peft_merge(tiny):
    """ΔW of the update (scaling·B@A) is exactly what peft's own merge adds to each weight."""
    base = copy.deepcopy(tiny)
    peft_model = attach_lora(tiny, rank=4, alpha=8.0, dropout=0.0, target_modules=["q_proj", "v_proj"])
    _randomize_lora(peft_model)
    update = extract_update(peft_model, _member(base), alpha=8.0, num_examples=5)
    assert update.num_examples == 5 and len(update.layers) == 2 * tiny.config.num_hidden_layers
    merged = peft_model.merge_and_unload()
    for key, factors in update.layers.items():
        w_merged = merged.get_submodule(key).weight
        w_base = base.get_submodule(key).weight
        torch.testing.assert_close(w_merged - w_base, factors.delta(), atol=1e-6, rtol=1e-5)


def test_load_update_roundtrips_and_rejects_wrong_shapes(tiny):
    src = attach_lora(copy.deepcopy(tiny), 4, 8.0, 0.0, ["q_proj", "v_proj"])
    _randomize_lora(src, seed=3)
    update = extract_update(src, _member(tiny), 8.0, 1)
    dst = attach_lora(copy.deepcopy(tiny), 4, 8.0, 0.0, ["q_proj", "v_proj"], seed=9)
    assert load_update(dst, _member(tiny), update, 8.0) == len(update.layers)
    for k, v in get_peft_model_state_dict(src).items():
        torch.testing.assert_close(get_peft_model_state_dict(dst)[k], v)
    bad = AdapterUpdate({k: LoraFactors(f.A[:2], f.B[:, :2], f.scaling) for k, f in update.layers.items()}, 1)
    with pytest.raises(ValueError, match="shape"):
        load_update(dst, _member(tiny), bad, 8.0)
    with pytest.raises(ValueError, match="lacks"):
        load_update(dst, _member(tiny), AdapterUpdate({"model.layers.99.q_proj": update.layers[next(iter(update.layers))]}, 1), 8.0)


def test_member_fold_matches_peft_merged_model(tiny):
    src = attach_lora(copy.deepcopy(tiny), 4, 8.0, 0.0, ["q_proj", "o_proj"])
    _randomize_lora(src, seed=5)
    update = extract_update(src, _member(tiny), 8.0, 1)
    reference = src.merge_and_unload()
    folded = copy.deepcopy(tiny)
    deeper = LoraFactors(torch.ones(4, 64), torch.ones(64, 4), 1.0)  # a layer this member lacks: skipped
    family_wide = AdapterUpdate({**update.layers, "model.layers.9.self_attn.q_proj": deeper}, 1)
    assert _member(folded).fold(family_wide) == len(update.layers)
    ids = torch.randint(0, 1000, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(folded(ids).logits, reference(ids).logits, atol=1e-5, rtol=1e-5)


def test_round_batches_walk_all_data_before_repeating_and_continue_across_rounds():
    one, end = round_batches(10, 3, 6, 0, seed=1)
    first, mid = round_batches(10, 3, 2, 0, seed=1)
    second, end2 = round_batches(10, 3, 4, mid, seed=1)
    assert first + second == one and end == end2 == 18
    flat = [i for b in one for i in b]
    assert sorted(flat[:10]) == list(range(10))


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_local_training_lowers_loss_and_evaluate_matches_transformers_loss(arch):
    ids = torch.randint(0, 500, (4, 16))
    small_vocab = tiny_model(arch, num_layers=4, vocab_size=512)  # no tokenizer needed: keep it fast
    model = attach_lora(small_vocab, 8, 16.0, 0.0, ["q_proj", "v_proj", "o_proj"])
    chunks = TokenChunks(ids, ["x"] * 4)
    before = evaluate(model, chunks, batch_size=2)
    with torch.no_grad():
        assert before["eval-loss"] == pytest.approx(model(input_ids=ids, labels=ids).loss.item(), rel=1e-5)
    opt = default_optimizer([p for p in model.parameters() if p.requires_grad], 1e-2)
    result = train_local(model, [ids] * 15, opt)
    assert result.steps == 15 and result.tokens == 15 * 64 and result.peak_rss_mb > 0
    after = evaluate(model, chunks, batch_size=2)
    assert after["eval-loss"] < before["eval-loss"] - 0.1
    assert 0.0 <= after["eval-accuracy"] <= 1.0


def test_optimizer_state_survives_a_round_trip(tiny):
    model = attach_lora(tiny, 4, 8.0, 0.0, ["q_proj"])
    names = {id(p): n for n, p in model.named_parameters() if p.requires_grad}
    params = [p for p in model.parameters() if p.requires_grad]
    opt = default_optimizer(params, 1e-3)
    train_local(model, [torch.randint(0, 500, (2, 8))] * 2, opt)
    saved = optimizer_state_arrays(opt, names)
    fresh = default_optimizer(params, 1e-3)
    assert restore_optimizer_state(fresh, names, saved) == len(params)
    for p in params:
        torch.testing.assert_close(fresh.state[p]["exp_avg"], opt.state[p]["exp_avg"])


def test_device_profile_from_node_config_and_defaults():
    cfg = load_config(["federation.members=[exit-1,exit-2]", "federation.ranks=[2,4,8]", "federation.num_edges=2"])
    p = device_profile({"partition-id": 3, "num-partitions": 4}, cfg)
    assert (p.member, p.lora_rank, p.edge_id) == ("exit-2", 2, 1)
    p = device_profile({"partition-id": 0, "num-partitions": 2, "member": "full", "lora-rank": 16, "edge-id": 5}, cfg)
    assert (p.member, p.lora_rank, p.edge_id) == ("full", 16, 5)
    with pytest.raises(AiflowError, match="partition-id"):
        device_profile({"partition-id": 2, "num-partitions": 2}, cfg)
    with pytest.raises(AiflowError, match="lora-rank"):
        device_profile({"lora-rank": 0}, cfg)


def test_run_folder_checkpoints_are_atomic_and_resume_checks_the_config(tmp_path):
    cfg = load_config([f"run.dir={tmp_path / 'r'}"])
    run = RunFolder.create(cfg)
    run.save_checkpoint(1, {"w": np.ones(3, np.float32)}, {"note": "one"})
    run.save_checkpoint(2, {"w": np.full(3, 2, np.float32)}, {"note": "two"})
    (run.checkpoint_dir / "round-0003.safetensors").write_bytes(b"torn write")  # a corrupt newest file
    latest = run.latest_checkpoint()
    assert latest.server_round == 2 and latest.meta == {"note": "two"} and latest.tensors["w"].tolist() == [2, 2, 2]
    assert not list(run.checkpoint_dir.glob(".*"))  # no temp files left behind
    run.log({"round": 1, "kind": "eval", "eval-loss": 2.0, "eval-accuracy": 0.1})
    run.log({"round": 3, "kind": "eval", "eval-loss": 1.0, "eval-accuracy": 0.2})
    with open(run.metrics_path, "a") as fh:
        fh.write('{"round": 4, "kind": "ev')  # killed mid-line
    assert [r["round"] for r in run.records()] == [1, 3]
    run.truncate_after(2)
    assert [r["round"] for r in run.records()] == [1]
    with pytest.raises(AiflowError, match="already exists"):
        RunFolder.create(cfg)
    RunFolder.open_for_resume(tmp_path / "r", load_config([f"run.dir={tmp_path / 'r'}", "federation.rounds=9"]))
    with pytest.raises(AiflowError, match="lora.rank"):
        RunFolder.open_for_resume(tmp_path / "r", load_config([f"run.dir={tmp_path / 'r'}", "lora.rank=3"]))
    assert run.plot().stat().st_size > 1000


def test_device_trains_a_family_member_under_family_wide_keys(tmp_path, tokenizer):
    """With a built family (family.dir), a device trains its EESB member; the branch layer's update
    travels as ``branch.<exit>.*``, and starting LoRA from an update equals folding it into the base."""
    from aiflow_fl.config import FamilyConfig
    from aiflow_fl.family import family_from_backbone
    from aiflow_fl.federated.device import DeviceState, device_evaluate, device_train

    backbone = tiny_model("llama", num_layers=4)
    family = family_from_backbone(backbone, tokenizer, FamilyConfig(kind="eesb", exits=[2], ratios=[0.5]),
                                  batches=[torch.randint(0, 500, (2, 24))])
    family.save(tmp_path / "family")
    cfg = load_config([f"family.dir={tmp_path / 'family'}", "data.source=stdlib", "data.seq_len=32", "train.batch_size=2",
                       "data.max_examples_per_client=8", "data.max_heldout_examples=4", "lora.target_modules=[q_proj,v_proj]"])
    profile = device_profile({"partition-id": 0, "num-partitions": 2, "member": "eesb-0", "lora-rank": 2}, cfg)
    update, metrics = device_train(cfg, profile, DeviceState(), None, None, 1, local_steps=2, lr=1e-2)
    assert set(update.layers) == {f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")} | {
        "branch.2.self_attn.q_proj", "branch.2.self_attn.v_proj"}
    assert metrics["train-steps"] == 2
    _, with_lora = device_evaluate(cfg, profile, None, update)
    _, with_base = device_evaluate(cfg, profile, update, None)  # the branch is decomposed: folded as a hook
    _, untouched = device_evaluate(cfg, profile, None, None)
    assert with_lora["eval-loss"] == pytest.approx(with_base["eval-loss"], rel=1e-5)
    assert with_lora["eval-loss"] != untouched["eval-loss"]


def test_cloud_round_bytes_are_summed_over_its_edge_rounds_and_plotted(tmp_path):
    """A cloud round of κ2 edge rounds carries the sum of what each link moved in every edge round."""
    from PIL import Image

    from aiflow_fl.federated.run import draw_summary
    from server.app import _link_totals

    edge_rounds = [
        {"bytes/device->edge": 100, "bytes/edge->cloud": 0, "cloud-bytes": 0, "sim-round-s": 0.5, "clients-ok": 4},
        {"bytes/device->edge": 120, "bytes/edge->cloud": 40, "cloud-bytes": 40, "sim-round-s": 0.7, "clients-ok": 3},
    ]
    totals = _link_totals(edge_rounds)
    assert totals == {"bytes/device->edge": 220, "bytes/edge->cloud": 40, "cloud-bytes": 40, "sim-round-s": 1.2}
    run = RunFolder.create(load_config([f"run.dir={tmp_path / 'r'}"]))
    run.log({"round": 1, "kind": "train", "train-loss": 2.0, **totals})
    run.log({"round": 1, "kind": "eval", "eval-loss": 2.0, "eval-accuracy": 0.1})
    assert Image.open(run.plot()).size[0] > 800
    bars = draw_summary(run).axes[3]  # panel (d): bytes per link, MB per cloud round
    heights = {t.get_text(): [p.get_height() for p in c] for t, c in zip(bars.get_legend().get_texts(), bars.containers)}
    assert heights == {"device->edge (uplink)": [220 / 1e6], "edge->device (downlink)": [0.0],
                       "edge->cloud (uplink)": [40 / 1e6], "cloud->edge (downlink)": [0.0]}
    plain = RunFolder.create(load_config([f"run.dir={tmp_path / 'p'}"]))
    plain.log({"round": 1, "kind": "train", "train-loss": 2.0})
    assert draw_summary(plain).axes[3].get_legend() is None  # nothing counted: no bars, a note instead


def test_loaded_members_share_frozen_weights_and_folding_a_base_touches_only_its_copy(tiny_llama_dir):
    """member_from_config hands out copies whose frozen weights are the cached tensors (no model copy per
    round); Member.fold gives its copy a new weight, so the cache and other copies stay pristine."""
    from aiflow_fl.family.member import member_from_config

    cfg = load_config([f"model.name={tiny_llama_dir}"])
    first, second = member_from_config(cfg, "exit-2"), member_from_config(cfg, "exit-2")
    q_first = first.model.get_submodule("model.layers.0.self_attn.q_proj")
    q_second = second.model.get_submodule("model.layers.0.self_attn.q_proj")
    assert q_first is not q_second and q_first.weight.data_ptr() == q_second.weight.data_ptr()
    assert first.model.lm_head.weight is first.model.model.embed_tokens.weight  # tying survives the copy
    pristine = q_second.weight.detach().clone()
    out, inp = q_first.weight.shape
    base = AdapterUpdate({"model.layers.0.self_attn.q_proj": LoraFactors(torch.ones(1, inp), torch.ones(out, 1), 0.5)}, 1)
    assert first.fold(base) == 1
    assert torch.allclose(q_first.weight, pristine + 0.5)
    assert torch.equal(q_second.weight, pristine) and torch.equal(member_from_config(cfg, "exit-2").model.get_submodule(
        "model.layers.0.self_attn.q_proj").weight, pristine)
