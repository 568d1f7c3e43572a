"""Resume after kill: `aiflow simulate` is SIGKILLed after its first checkpoint; `run.resume=RUN_DIR`
finishes the remaining rounds from that checkpoint, with one metrics line per round."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from aiflow_fl.federated.deploy import group_members
from aiflow_fl.federated.run import RunFolder, config_for
from simulations.run import simulate


@pytest.mark.timeout(600)
def test_killed_simulation_resumes_from_its_last_checkpoint(tiny_llama_dir, tmp_path):
    run_dir = tmp_path / "run"
    overrides = [
        f"model.name={tiny_llama_dir}", "family.dir=/nonexistent", "data.source=stdlib", "data.seq_len=32",
        "data.max_examples_per_client=16", "data.max_heldout_examples=4", "train.local_steps=1", "train.batch_size=2",
        "federation.members=[exit-4]", "federation.ranks=[2]", "federation.num_devices=2", "federation.rounds=3",
        f"run.dir={run_dir}",
    ]
    proc = subprocess.Popen([sys.executable, "-m", "aiflow_fl.cli", "simulate", *overrides], start_new_session=True,
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
