"""Deployment: a real flower-superlink and two flower-supernode processes on loopback, driven by `flwr run`."""

from __future__ import annotations

import tomllib

import pytest

from aiflow_fl.config import flatten, load_config
from aiflow_fl.federated import deploy
from aiflow_fl.federated.run import RunFolder, config_for


def test_flower_run_config_matches_the_default_config():
    declared = tomllib.loads((deploy.APP_DIR / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    flat = flatten(load_config())
    assert {k: flat[k] for k in declared} == declared
    assert {"model.name", "federation.rounds", "run.dir", "run.resume", "data.source"} <= set(declared)


def test_node_configs_carry_each_device_profile():
    cfg = load_config(["federation.members=[exit-2,exit-4]", "federation.ranks=[2,4]", "federation.num_edges=2"])
    nodes = deploy.node_configs(cfg, 4, {3: {"lora-rank": 8}})
    assert [(n["member"], n["lora-rank"], n["edge-id"]) for n in nodes] == [
        ("exit-2", 2, 0), ("exit-4", 4, 0), ("exit-2", 2, 1), ("exit-4", 8, 1)]
    assert deploy.node_config_string(nodes[0]) == 'partition-id=0 num-partitions=4 member="exit-2" lora-rank=2 edge-id=0'


@pytest.mark.timeout(600)
def test_superlink_and_two_supernodes_run_two_rounds(tiny_llama_dir, tmp_path):
    run_dir = tmp_path / "run"
    cfg = config_for([
        f"model.name={tiny_llama_dir}", "family.dir=/nonexistent", "data.source=stdlib", "data.seq_len=32",
        "data.max_examples_per_client=16", "data.max_heldout_examples=4", "train.local_steps=1", "train.batch_size=2",
        "federation.members=[exit-2,exit-4]", "federation.ranks=[2,4]", "federation.rounds=2", f"run.dir={run_dir}",
    ])
    deployment = deploy.start(cfg, 2, tmp_path / "work")
    groups = [p.pid for p in deployment.processes]
    try:
        result = deploy.run(deployment, cfg, timeout_s=420)
        assert result.status == "finished:completed", result.logs[-2000:]
        listed = deployment.flwr("ls", deploy.CONNECTION, "--format", "json").stdout
        assert str(result.run_id) in listed and "finished:completed" in listed
    finally:
        deployment.stop()
    assert not any(deploy.group_members(g) for g in groups)  # SuperLink, SuperNodes and their app processes
    folder = RunFolder(run_dir)
    train = folder.records("train")
    assert [t["round"] for t in train] == [1, 2] and all(t["clients-ok"] == 2 for t in train)
    assert [r for r, _ in folder.checkpoints()] == [1, 2]
    # Each SuperNode ran its own member: the profile came from --node-config.
    logs = "".join((tmp_path / "work" / "logs" / f"supernode-{i}.log").read_text() for i in range(2))
    assert "Start `flwr-clientapp` process" in logs
