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
