"""Federated fine-tuning under Flower's real simulation engine (Ray): faults, min_clients, run folder.

A tiny random Llama (saved with the real SmolLM2 tokenizer) keeps each round a few seconds; most of
a test's time is Ray start-up.
"""

from __future__ import annotations

import pytest

from aiflow_fl.errors import AiflowError
from aiflow_fl.federated.run import RunFolder
from simulations.run import config_for, simulate


def tiny_overrides(model_dir, run_dir, *extra: str) -> list[str]:
    return [
        f"model.name={model_dir}", "family.dir=/nonexistent", "data.source=stdlib", "data.seq_len=32",
        "data.max_examples_per_client=32", "data.max_heldout_examples=8", "train.local_steps=2", "train.batch_size=2",
        "federation.members=[exit-2,exit-4]", "federation.ranks=[2,4]", f"run.dir={run_dir}", *extra,
    ]


def test_faulty_clients_are_left_out_and_the_run_fails_clearly_below_min_clients(tiny_llama_dir, tmp_path):
    """Heterogeneous members (exit-2 / exit-4) and ranks (2 / 4). Round 1: a client raises and one
    sends NaN; round 2: wrong shapes and a missing tensor; round 3: three of four fail, fewer than
    federation.min_clients=2 -> a clear error, with the finished rounds' metrics and checkpoints kept."""
    run_dir = tmp_path / "run"
    cfg = config_for(tiny_overrides(tiny_llama_dir, run_dir, "federation.num_devices=4", "federation.rounds=3",
                                    "federation.min_clients=2", "federation.fraction_evaluate=1.0"))
    faults = {
        0: {"fault": "raise", "fault-rounds": "1,3"},
        1: {"fault": "nan", "fault-rounds": "1,3"},
        2: {"fault": "shape", "fault-rounds": "2,3"},
        3: {"fault": "missing", "fault-rounds": "2"},
    }
    with pytest.raises(Exception) as info:
        simulate(cfg, show_progress=False, node_overrides=faults)
    assert "min_clients" in str(info.value) and "Round 3" in str(info.value)
    assert isinstance(info.value, AiflowError)
    folder = RunFolder(run_dir)
    train = {r["round"]: r for r in folder.records("train")}
    assert sorted(train) == [1, 2]
    assert [(train[r]["clients-ok"], train[r]["clients-failed"]) for r in (1, 2)] == [(2, 2), (2, 2)]
    assert [r for r, _ in folder.checkpoints()] == [1, 2]
    assert folder.records("failed") and (run_dir / "summary.png").is_file()
    assert max(t["client-peak-rss-mb"] for t in train.values()) > 0
    # Central evaluation of both members after every finished round.
    evals = folder.records("eval")
    assert [r["round"] for r in evals] == [0, 1, 2]
    assert {"eval-loss/exit-2", "eval-loss/exit-4", "eval-accuracy/exit-4"} <= set(evals[-1])
    # The merged update covers the deepest member's layers (exit-4: layers 0-3), q and v of each,
    # and central evaluation really applies it (the deeper member's held-out loss moved).
    latest = folder.latest_checkpoint()
    merged = latest.merged().layers
    assert set(merged) == {f"model.layers.{i}.self_attn.{p}" for i in range(4) for p in ("q_proj", "v_proj")}
    assert latest.server_round == 2 and any(float(f.B.abs().sum()) > 0 for f in merged.values())
    # the checkpoint keeps the adapter at the configured global rank (it does not grow round by round)
    adapter_ranks = {v.shape[0] for k, v in latest.tensors.items() if k.startswith("adapter/") and k.endswith("::A")}
    assert adapter_ranks and max(adapter_ranks) <= (cfg.federation.global_rank or max(cfg.federation.ranks)), adapter_ranks
    assert evals[-1]["eval-loss/exit-4"] != evals[0]["eval-loss/exit-4"]
    assert "exit-4" in (run_dir / "config.yaml").read_text()
    # Every device also evaluated the global update on its own held-out data (the ClientApp's evaluate).
    device_evals = folder.records("device-eval")
    assert [(r["round"], r["devices"]) for r in device_evals] == [(1, 4), (2, 4)]
    assert all(0.0 <= r["eval-accuracy"] <= 1.0 and r["eval-loss"] > 0 for r in device_evals)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_client_that_hangs_is_left_out_after_the_timeout(tiny_llama_dir, tmp_path):
    """One of two devices sleeps past federation.client_timeout_s: the round goes on without it.

    (Ray ends the simulation only once the sleeping call returns, so the sleep is kept short.)"""
    run_dir = tmp_path / "run"
    cfg = config_for(tiny_overrides(tiny_llama_dir, run_dir, "federation.num_devices=2", "federation.rounds=1",
                                    "federation.client_timeout_s=75"))
    simulate(cfg, show_progress=False, node_overrides={1: {"fault": "hang", "fault-seconds": 95}})
    train = RunFolder(run_dir).records("train")
    assert [(t["clients-ok"], t["clients-failed"]) for t in train] == [(1, 1)]
    assert any("timed out after 75 s" in f for f in train[0]["failures"])
