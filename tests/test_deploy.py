"""Deployment: a real flower-superlink and two flower-supernode processes on loopback, driven by `flwr run`,
over TLS with SuperNode authentication (certificates and key pairs generated for the run)."""

from __future__ import annotations

import json
import time
import tomllib

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from aiflow_fl.config import flatten, load_config
from aiflow_fl.federated import deploy
from aiflow_fl.federated.run import RunFolder, config_for
from aiflow_fl.federated.security import make_node_key, make_tls


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


def test_generated_credentials_are_what_flower_loads(tmp_path):
    """The server certificate is signed by the CA and names the loopback addresses; a node key is an
    OpenSSH EC P-384 pair (what flower-supernode and `flwr supernode register` load); the commands
    and the connection carry TLS and authentication, and --insecure carries neither."""
    tls = make_tls(tmp_path / "tls")
    ca = x509.load_pem_x509_certificate(tls.ca_cert.read_bytes())
    cert = x509.load_pem_x509_certificate(tls.cert.read_bytes())
    cert.verify_directly_issued_by(ca)
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "localhost" in sans.get_values_for_type(x509.DNSName)
    assert {str(ip) for ip in sans.get_values_for_type(x509.IPAddress)} >= {"127.0.0.1", "::1"}
    assert tls.key.stat().st_mode & 0o077 == 0
    key = make_node_key(tmp_path / "keys", "n0")
    private = serialization.load_ssh_private_key(key.private.read_bytes(), None)
    public = serialization.load_ssh_public_key(key.public.read_bytes())
    assert isinstance(private, ec.EllipticCurvePrivateKey) and private.curve.name == "secp384r1"
    assert public.public_numbers() == private.public_key().public_numbers()
    secure = deploy.superlink_command(9000, tmp_path / "db", tls, supernode_auth=True)
    assert "--insecure" not in secure and "--enable-supernode-auth" in secure
    assert secure[secure.index("--ssl-ca-certfile") + 1] == str(tls.ca_cert)
    assert "--insecure" in deploy.superlink_command(9000, tmp_path / "db", None, supernode_auth=True)
    assert tomllib.loads(deploy.connection_toml(9000, tls))["superlink"]["deploy"]["root-certificates"] == str(tls.ca_cert)
    assert tomllib.loads(deploy.connection_toml(9000, None))["superlink"]["deploy"]["insecure"] is True
    assert "INSECURE" in deploy.INSECURE_NOTICE


def _online_nodes(deployment) -> set[str]:
    listed = deployment.flwr("supernode", "ls", deploy.CONNECTION, "--format", "json").stdout
    return {n["node-id"] for n in json.loads(listed)["nodes"] if n["status"] == "online"}


@pytest.mark.timeout(600)
def test_superlink_and_two_supernodes_run_two_rounds(tiny_llama_dir, tmp_path):
    """TLS + SuperNode authentication: the two registered SuperNodes complete two rounds; a SuperNode
    whose key is not registered is refused, and so is one that connects in plaintext."""
    run_dir = tmp_path / "run"
    cfg = config_for([
        f"model.name={tiny_llama_dir}", "family.dir=/nonexistent", "data.source=stdlib", "data.seq_len=32",
        "data.max_examples_per_client=16", "data.max_heldout_examples=4", "train.local_steps=1", "train.batch_size=2",
        "federation.members=[exit-2,exit-4]", "federation.ranks=[2,4]", "federation.rounds=2", f"run.dir={run_dir}",
    ])
    deployment = deploy.start(cfg, 2, tmp_path / "work")
    assert deployment.secure and deployment.supernode_auth and len(deployment.node_keys) == 2
    groups = [p.pid for p in deployment.processes]
    try:
        result = deploy.run(deployment, cfg, timeout_s=420)
        assert result.status == "finished:completed", result.logs[-2000:]
        listed = deployment.flwr("ls", deploy.CONNECTION, "--format", "json").stdout
        assert str(result.run_id) in listed and "finished:completed" in listed
        members = _online_nodes(deployment)
        assert len(members) == 2
        # an unregistered key: the SuperLink refuses to activate the node, which exits with an error
        stranger = deployment.start_supernode({"partition-id": 2, "num-partitions": 3}, "stranger.log",
                                              make_node_key(tmp_path / "work" / "keys", "stranger"))
        # plaintext against the TLS SuperLink (Flower itself refuses a key without TLS, so none is
        # given): every attempt fails, a few retries, then it gives up
        plain = deployment.start_supernode({"partition-id": 2, "num-partitions": 3}, "plain.log",
                                           None, insecure=True, extra_args=("--max-retries", "2"))
        deadline = time.monotonic() + 90
        while (stranger.poll() is None or plain.poll() is None) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert stranger.poll() not in (None, 0) and plain.poll() not in (None, 0), (stranger.poll(), plain.poll())
        assert "Failed to activate SuperNode" in (tmp_path / "work" / "logs" / "stranger.log").read_text()
        assert "Connection attempt failed" in (tmp_path / "work" / "logs" / "plain.log").read_text()
        assert _online_nodes(deployment) == members  # neither joined
        groups += [stranger.pid, plain.pid]
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


def test_every_key_the_apps_read_is_declared_in_the_flower_run_config():
    """Flower drops run-config overrides whose key the app's pyproject does not declare (and
    ``aiflow deploy`` sends only declared keys), so an undeclared key silently keeps its default in
    deployment: e.g. the attack settings, trimmed_mean's trim_fraction, the DP budget."""
    declared = tomllib.loads((deploy.APP_DIR / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    read_by_apps = ("federation.", "hierarchy.", "privacy.", "continual.", "lora.", "train.", "data.")
    flat = flatten(load_config())
    missing = sorted(k for k in flat if k.startswith(read_by_apps) and k not in declared)
    assert not missing, missing
    assert {"federation.attack_fraction", "federation.attack", "federation.attack_scale", "hierarchy.trim_fraction",
            "privacy.target_epsilon", "collab.save_specialists"} <= set(declared)
    overrides = deploy.run_config_overrides(load_config(["federation.attack_fraction=0.2", "strategy=trimmed_mean",
                                                         "hierarchy.trim_fraction=0.3"]))
    assert overrides["federation.attack_fraction"] == 0.2 and overrides["hierarchy.trim_fraction"] == 0.3
