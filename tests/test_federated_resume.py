"""Resume after kill: `aiflow simulate` with DP-SGD on is SIGKILLed after its first checkpoint;
`run.resume=RUN_DIR` finishes the remaining rounds from that checkpoint, with one metrics line per
round, and ends where an uninterrupted run of the same config ends: the same per-device ε (equal to
Opacus's own RDP accountant for all the steps the device took) and the same final adapters."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from opacus.accountants import RDPAccountant

from aiflow_fl.federated.deploy import group_members
from aiflow_fl.federated.run import RunFolder, config_for
from simulations.run import simulate


@pytest.mark.timeout(600)
def test_killed_simulation_resumes_from_its_last_checkpoint(tiny_llama_dir, tmp_path):
    run_dir = tmp_path / "run"
    overrides = [
        f"model.name={tiny_llama_dir}", "family.dir=/nonexistent", "data.source=stdlib", "data.seq_len=32",
        "data.max_examples_per_client=16", "data.max_heldout_examples=4", "train.local_steps=2", "train.batch_size=4",
        "federation.members=[exit-4]", "federation.ranks=[2]", "federation.num_devices=2", "federation.rounds=3",
        "privacy.enabled=true", "privacy.noise_multiplier=1.0", "privacy.delta=1e-5",
    ]
    overrides_killed = [*overrides, f"run.dir={run_dir}"]
    proc = subprocess.Popen([sys.executable, "-m", "aiflow_fl.cli", "simulate", *overrides_killed], start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    folder = RunFolder(run_dir)
    try:
        deadline = time.monotonic() + 400
        while not folder.checkpoints() and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.2)
        assert folder.checkpoints(), "the first round never finished"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and everything it started (Ray included)
        proc.wait(timeout=30)
    deadline = time.monotonic() + 30
    while group_members(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not group_members(proc.pid)
    killed_at = folder.checkpoints()[-1][0]
    assert killed_at < 3, "the run finished before it was killed; the test needs a slower run"

    summary = simulate(config_for([f"run.resume={run_dir}"]), show_progress=False)
    assert summary.resumed_from == killed_at
    train = [r["round"] for r in folder.records("train")]
    assert train == [1, 2, 3]  # each round once: nothing lost, nothing duplicated
    assert [r["round"] for r in folder.records("eval")] == [0, 1, 2, 3]
    resume = folder.records("resume")
    assert len(resume) == 1 and resume[0]["from-checkpoint"].endswith(f"round-{killed_at:04d}.safetensors")
    assert [r for r, _ in folder.checkpoints()] == [1, 2, 3]

    # The uninterrupted run of the same config, in this process.
    straight_dir = tmp_path / "straight"
    simulate(config_for([*overrides, f"run.dir={straight_dir}"]), show_progress=False)
    straight = RunFolder(straight_dir)

    def final_epsilons(f: RunFolder) -> dict[int, dict]:
        return {int(r["device"]): r for r in f.records("privacy") if r["round"] == 3}

    resumed_eps, straight_eps = final_epsilons(folder), final_epsilons(straight)
    assert sorted(resumed_eps) == sorted(straight_eps) == [0, 1]
    for device, r in resumed_eps.items():
        assert r["dp-epsilon"] == pytest.approx(straight_eps[device]["dp-epsilon"], rel=1e-12)
        reference = RDPAccountant()  # Opacus's own accountant for every step this device took
        reference.history = [(1.0, r["dp-sample-rate"], int(r["dp-steps"]))]
        assert r["dp-steps"] == 6  # 3 rounds × 2 local steps: the accountant survived the kill
        assert r["dp-epsilon"] == pytest.approx(reference.get_epsilon(delta=1e-5), rel=1e-9)
    # the round after the resume restored each device's optimizer state (it was reset before)
    after = [r for r in folder.records("train") if r["round"] == killed_at + 1]
    assert all(r["train-loss"] > 0 for r in folder.records("train"))  # DP-SGD steps on real batches
    assert after and after[0]["optimizer-restored-min"] > 0, after
    # and the trained model is the same, factor by factor
    a, b = folder.latest_checkpoint(), straight.latest_checkpoint()
    assert a.server_round == b.server_round == 3 and set(a.tensors) == set(b.tensors)
    for key in a.tensors:
        np.testing.assert_allclose(np.asarray(a.tensors[key]), np.asarray(b.tensors[key]), rtol=1e-5, atol=1e-7, err_msg=key)
