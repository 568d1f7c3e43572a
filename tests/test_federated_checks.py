"""Bad values and missing inputs stop `aiflow simulate` before Ray, Flower or a run folder exist."""

from __future__ import annotations

import pytest

from aiflow_fl.config import load_config
from aiflow_fl.errors import AiflowError
from aiflow_fl.federated.run import config_for
from simulations.run import simulate


@pytest.mark.parametrize(("override", "message"), [
    ("federation.rounds=-1", "'federation.rounds' is -1; it must be ≥ 1"),
    ("train.lr=-1", "'train.lr' is -1.0; it must be > 0"),
    ("federation.fraction_train=1.5", "'federation.fraction_train' is 1.5"),
    ("federation.ranks=[4,0]", "'federation.ranks' is \\[4, 0\\]"),
    ("lora.dropout=1.0", "'lora.dropout' is 1.0"),
    ("federation.min_clients=9", "min_clients is 9 but federation.num_devices is only 4"),
    ("federation.downlink=fast", "'federation.downlink' is 'fast', which is not one of: exact, lean"),
])
def test_the_schema_refuses_values_out_of_range(override: str, message: str) -> None:
    with pytest.raises(AiflowError, match=message):
        load_config([override])


@pytest.mark.parametrize(("override", "message"), [
    ("data.source=/nonexistent/data.jsonl", "data.source"),
    ("federation.members=[exit-99]", "federation.members names 'exit-99'"),
    ("federation.members=[nosuchmember]", "federation.members names 'nosuchmember'"),
])
def test_missing_data_or_unknown_member_stop_before_ray_and_leave_no_run_folder(tiny_llama_dir, tmp_path, override, message) -> None:
    import ray

    run_dir = tmp_path / "run"
    cfg = config_for([f"model.name={tiny_llama_dir}", "family.dir=/nonexistent", "data.source=stdlib", "data.seq_len=32",
                      "federation.members=[exit-2]", "federation.ranks=[2]", f"run.dir={run_dir}", override])
    with pytest.raises(AiflowError, match=message):
        simulate(cfg, show_progress=False)
    assert not ray.is_initialized()
    assert not run_dir.exists()
    assert not tmp_path.joinpath("runs").exists()


def test_a_non_empty_run_folder_is_refused_before_ray(tiny_llama_dir, tmp_path) -> None:
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "something").write_text("x")
    cfg = config_for([f"model.name={tiny_llama_dir}", "family.dir=/nonexistent", f"run.dir={tmp_path / 'run'}"])
    with pytest.raises(AiflowError, match="already exists and is not empty"):
        simulate(cfg, show_progress=False)


def test_attackers_are_drawn_per_partition_and_poison_the_update_exactly():
    """The attacker set is a function of (seed, partition id) alone, close to the asked fraction over
    many devices; a poisoned update's ΔW = s·B·A is the honest one times c (scale) or -c (signflip)."""
    import torch

    from aiflow_fl.aggregation.update import AdapterUpdate, LoraFactors
    from aiflow_fl.federated.attacks import is_attacker, poison

    drawn = [is_attacker(2, i, 0.2) for i in range(5000)]
    assert abs(sum(drawn) / len(drawn) - 0.2) < 0.02
    assert drawn[:10] == [is_attacker(2, i, 0.2) for i in range(10)]  # the same in every process
    assert [i for i in range(10) if drawn[i]] == [2, 5]  # the scale benchmark relies on this (run.seed=2)
    assert not any(is_attacker(2, i, 0.0) for i in range(100))
    gen = torch.Generator().manual_seed(0)
    honest = AdapterUpdate({"m": LoraFactors(torch.randn(2, 5, generator=gen), torch.randn(6, 2, generator=gen), 2.0)}, 7)
    # the adapter the device was sent (P0) and the one it trained from it (P)
    sent = {"m": LoraFactors(torch.randn(2, 5, generator=gen), torch.randn(6, 2, generator=gen), 0.5)}
    for attack, factor in (("scale", 10.0), ("signflip", -10.0)):
        bad = poison(honest, attack, 10.0)  # round 1: a fresh LoRA (P0 = 0), the change is P itself
        torch.testing.assert_close(bad.layers["m"].delta(), factor * honest.layers["m"].delta())
        assert bad.num_examples == 7 and bad.layers["m"].A.shape == (2, 5)
        # later rounds: the change P - P0 is what is scaled, not the server's adapter P0 (dense reference)
        p0, p = sent["m"].delta().double(), honest.layers["m"].delta().double()
        moved = poison(honest, attack, 10.0, start=sent).layers["m"]
        torch.testing.assert_close(moved.delta().double(), p0 + factor * (p - p0), rtol=1e-5, atol=1e-5)
        assert moved.rank <= 2 * honest.layers["m"].rank
        zero_start = {"m": LoraFactors(sent["m"].A, torch.zeros(6, 2), 0.5)}  # peft's fresh pair: B = 0
        assert poison(honest, attack, 10.0, start=zero_start).layers["m"].rank == 2
    with pytest.raises(AiflowError, match="not one of"):
        poison(honest, "gaussian", 1.0)


def test_one_partition_is_the_same_as_that_partition_of_all():
    from aiflow_fl.data.partition import partition_indices

    domains = [f"d{i % 7}" for i in range(300)]
    for partitioner in ("iid", "dirichlet"):
        every = partition_indices(domains, 12, partitioner, seed=3)
        assert [partition_indices(domains, 12, partitioner, seed=3, only=i)[0] for i in (0, 5, 11)] == [every[0], every[5], every[11]]


def test_robust_rules_resist_two_sign_flipped_updates_of_ten_and_fedavg_does_not():
    """Ten honest updates scattered around one ΔW*; two of them sign-flipped ×10 (the bench's attack).
    The median and the 20 % trimmed mean stay close to ΔW*; FedAvg lands on the other side."""
    import torch

    from aiflow_fl.aggregation import METHODS, lowrank
    from aiflow_fl.aggregation.update import AdapterUpdate, LoraFactors
    from aiflow_fl.federated.attacks import poison

    gen = torch.Generator().manual_seed(1)
    A, B = torch.randn(2, 8, generator=gen), torch.randn(8, 2, generator=gen)
    target = (B @ A).double()
    updates = []
    for i in range(10):
        honest = AdapterUpdate({"m": LoraFactors(A + 0.05 * torch.randn(2, 8, generator=gen), B, 1.0)}, 10)
        updates.append(poison(honest, "signflip", 10.0) if i in (2, 5) else honest)
    for name in ("median", "trimmed_mean", "fedavg"):
        merged = lowrank.dense(METHODS[name](updates).adapter)["m"]
        error = float((merged - target).norm() / target.norm())
        cosine = float((merged * target).sum() / (merged.norm() * target.norm()))
        if name == "fedavg":
            assert cosine < 0, (name, cosine)  # (8 − 20)/10 = −1.2 ΔW*: the wrong way
        else:
            assert error < 0.1 and cosine > 0.99, (name, error, cosine)


def test_a_ray_address_joins_that_cluster_instead_of_sizing_a_local_one(monkeypatch):
    from simulations.run import backend_config

    cfg = load_config(["federation.client_cpus=1"])
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    local = backend_config(cfg)
    assert "num_cpus" in local["init_args"] and "address" not in local["init_args"]
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.5:6379")
    joined = backend_config(cfg)
    assert joined["init_args"]["address"] == "10.0.0.5:6379" and "num_cpus" not in joined["init_args"]
    assert joined["client_resources"] == local["client_resources"]
