"""DP and continual learning inside the federated device round (the code path the ClientApp runs):
``device_train`` with ``clients.app.training_hooks`` and the device state carried through Flower's
``context.state`` between rounds, on a tiny saved model and real pydoc / stdlib text."""

from __future__ import annotations


import pytest
from flwr.app import Context, RecordDict
from opacus.accountants import RDPAccountant

from aiflow_fl.config import load_config
from aiflow_fl.errors import AiflowError
from aiflow_fl.federated.device import device_profile, device_train, load_device_data
from aiflow_fl.models import load_tokenizer, tiny_model_folder


@pytest.fixture(scope="module")
def tiny_dir() -> str:
    """A tiny model folder at a fixed path, so the tokenized-data cache (keyed by it) is reused."""
    return str(tiny_model_folder("llama", num_layers=2, hidden_size=32))


def config(tiny_dir: str, *extra: str):
    return load_config([
        f"model.name={tiny_dir}", "federation.members=[exit-2]", "federation.ranks=[4]", "federation.num_devices=2",
        "federation.rounds=3", "data.source=pydoc", "data.partitioner=iid", "data.seq_len=32",
        "data.max_examples_per_client=40", "train.batch_size=8", "train.local_steps=3", *extra,
    ])


def run_rounds(cfg, rounds: int, partition: int = 0) -> list[dict[str, float]]:
    from clients.app import load_state, save_state, training_hooks

    context = Context(run_id=1, node_id=partition, node_config={"partition-id": partition, "num-partitions": 2},
                      state=RecordDict(), run_config={})
    profile = device_profile(dict(context.node_config), cfg)
    out = []
    for server_round in range(1, rounds + 1):
        state = load_state(context)  # as the ClientApp does: a fresh process each round
        _, metrics = device_train(cfg, profile, state, None, None, server_round, cfg.train.local_steps, 1e-3,
                                  hooks=training_hooks(cfg, state, profile))
        save_state(context, state)
        out.append(metrics)
    return out


def test_device_reports_epsilon_composed_over_its_rounds(tiny_dir: str) -> None:
    cfg = config(tiny_dir, "privacy.enabled=true", "privacy.target_epsilon=6", "privacy.max_grad_norm=0.5",
                 "federation.rounds=2", "train.local_steps=2")
    metrics = run_rounds(cfg, 2)
    n = len(load_device_data(cfg, device_profile({"partition-id": 0, "num-partitions": 2}, cfg),
                             load_tokenizer(tiny_dir)).train)
    sigma, q = metrics[0]["dp-noise-multiplier"], metrics[0]["dp-sample-rate"]
    assert q == pytest.approx(1 / -(-n // 8))
    for r, m in enumerate(metrics, start=1):
        reference = RDPAccountant()
        reference.history = [(sigma, q, 2 * r)]
        assert m["dp-steps"] == 2 * r
        assert m["dp-epsilon"] == pytest.approx(reference.get_epsilon(delta=1e-5), rel=1e-9)
        assert m["dp-noise-multiplier"] == sigma  # derived once, kept for the run
    assert 5.9 <= metrics[-1]["dp-epsilon"] <= 6.0  # the target is met for the whole run, not per round


def test_bad_delta_is_refused_on_the_device_before_training(tiny_dir: str) -> None:
    cfg = config(tiny_dir, "privacy.enabled=true", "privacy.delta=0.1")
    with pytest.raises(AiflowError, match="privacy.delta is 0.1"):
        run_rounds(cfg, 1)


def test_stages_come_from_different_domains_and_fill_the_replay_buffer(tiny_dir: str) -> None:
    cfg = config(tiny_dir, "continual.enabled=true", "continual.stages=2", "federation.rounds=2",
                 "continual.replay=reservoir", "continual.replay_fraction=0.25", "continual.buffer_size=8",
                 "train.local_steps=1")
    metrics = run_rounds(cfg, 2)
    assert [m["stage"] for m in metrics] == [0.0, 1.0]
    assert [m["replay-buffer"] for m in metrics] == [0.0, 8.0]
    assert all(m["train-steps"] == 1 for m in metrics)


def test_continual_with_dp_composes_over_stages(tiny_dir: str) -> None:
    cfg = config(tiny_dir, "continual.enabled=true", "continual.stages=2", "federation.rounds=2",
                 "continual.replay=stage", "continual.replay_fraction=0.25", "continual.buffer_size=8",
                 "privacy.enabled=true", "privacy.noise_multiplier=1.0", "train.local_steps=2")
    metrics = run_rounds(cfg, 2)
    assert metrics[1]["dp-steps"] == 4
    reference = RDPAccountant()
    reference.history = [(1.0, metrics[0]["dp-sample-rate"], 2), (1.0, metrics[1]["dp-sample-rate"], 2)]
    assert metrics[1]["dp-epsilon"] == pytest.approx(reference.get_epsilon(delta=1e-5), rel=1e-9)


@pytest.mark.slow  # Ray start-up plus four client rounds: minutes on a shared 2-core machine
def test_real_flower_simulation_logs_epsilon_per_device_and_stage_accuracy(tiny_dir: str, tmp_path) -> None:
    """The ServerApp + ClientApp under Flower's simulation engine: every device's composed ε lands in
    the run folder each round (equal to Opacus's accountant for its history), the continual stages are
    evaluated, and the run's privacy/continual plot is written."""
    from aiflow_fl.federated.run import RunFolder
    from simulations.run import simulate

    run_dir = tmp_path / "run"
    cfg = config(tiny_dir, "family.dir=/nonexistent", "federation.rounds=2", "train.local_steps=2",
                 "data.max_heldout_examples=8", "privacy.enabled=true", "privacy.noise_multiplier=1.2",
                 "continual.enabled=true", "continual.stages=2", "continual.replay=reservoir",
                 "continual.replay_fraction=0.25", "continual.buffer_size=8", f"run.dir={run_dir}")
    simulate(cfg, show_progress=False)
    folder = RunFolder(run_dir)
    privacy = folder.records("privacy")
    assert sorted((r["round"], r["device"]) for r in privacy) == [(1, 0), (1, 1), (2, 0), (2, 1)]
    for r in privacy:
        assert r["dp-steps"] == 2 * r["round"] and r["dp-noise-multiplier"] == 1.2
    for device in (0, 1):  # composed, not per round: the second round's ε is the larger
        first, second = (r["dp-epsilon"] for r in sorted(privacy, key=lambda r: r["round"]) if r["device"] == device)
        assert 0 < first < second
    continual = folder.records("continual")
    assert [r["round"] for r in continual] == [1, 2]
    assert set(continual[0]) >= {"stage", "stage-acc-0"} and set(continual[1]) >= {"stage-acc-1", "forgetting-0"}
    assert (run_dir / "privacy-continual.png").is_file()


def test_bad_values_stop_the_run_before_any_training(tiny_dir: str, tmp_path) -> None:
    from aiflow_fl.continual import check_run_config

    with pytest.raises(AiflowError, match="stages is 3 but the run has only 2 rounds"):
        check_run_config(config(tiny_dir, "federation.rounds=2", "continual.enabled=true", "continual.stages=3"))
    with pytest.raises(AiflowError, match="target_epsilon is -1"):
        check_run_config(config(tiny_dir, "privacy.enabled=true", "privacy.target_epsilon=-1"))
    with pytest.raises(AiflowError, match="max_grad_norm is 0"):
        check_run_config(config(tiny_dir, "privacy.enabled=true", "privacy.max_grad_norm=0"))


@pytest.mark.slow  # ~27 s on the shared 2-core machine, almost all of it Ray start-up
def test_central_dp_under_the_real_flower_simulation(tiny_llama_dir, tmp_path) -> None:
    """privacy.server_side=true through Flower's simulation engine: the run finishes, every round's
    run-folder line reports the central ε (Opacus RDP, q = 1, r releases) and the noise std σ_s C_s / m,
    and the noised global update is finite and not zero."""
    import math

    from aiflow_fl.federated.run import RunFolder
    from aiflow_fl.privacy import server_side_epsilon
    from simulations.run import config_for, simulate

    run_dir = tmp_path / "run"
    cfg = config_for([
        f"model.name={tiny_llama_dir}", "family.dir=/nonexistent", "data.source=pydoc", "data.seq_len=16",
        "data.max_examples_per_client=8", "data.max_heldout_examples=4", "train.local_steps=1", "train.batch_size=2",
        "federation.members=[exit-2]", "federation.ranks=[2]", "federation.num_devices=2", "federation.rounds=2",
        "strategy=fedavg", "privacy.server_side=true", "privacy.server_noise_multiplier=0.8",
        "privacy.server_clipping_norm=0.5", f"run.dir={run_dir}",
    ])
    simulate(cfg, show_progress=False)
    folder = RunFolder(run_dir)
    central = sorted(folder.records("privacy-central"), key=lambda r: r["round"])
    assert [r["round"] for r in central] == [1, 2]
    for r in central:
        assert r["devices"] == 2 and r["dp-server-noise-std"] == pytest.approx(0.8 * 0.5 / 2)
        assert r["dp-server-epsilon"] == pytest.approx(server_side_epsilon(0.8, r["round"], 1e-5))
    assert central[0]["dp-server-epsilon"] < central[1]["dp-server-epsilon"]
    merged = folder.latest_checkpoint()
    values = [float(v.abs().sum()) if hasattr(v, "abs") else float(abs(v).sum()) for v in merged.tensors.values()]
    assert all(math.isfinite(v) for v in values) and sum(values) > 0
