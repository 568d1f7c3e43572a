"""`aiflow family build | info | eval` on a tiny local model folder, and a bad override."""

from __future__ import annotations

import pytest
import torch
from typer.testing import CliRunner

from aiflow_fl.cli import app
from aiflow_fl.errors import AiflowError
from aiflow_fl.family import load_family_member
from aiflow_fl.models import tiny_model


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tokenizer):
    folder = tmp_path_factory.mktemp("tiny-llama")
    tiny_model("llama", num_layers=3).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_build_info_eval(model_dir, tmp_path):
    runner = CliRunner()
    fam = tmp_path / "fam"
    result = runner.invoke(app, ["family", "build", f"model.name={model_dir}", f"family.dir={fam}", "family.kind=both",
                                 "family.exits=[1,2]", "family.ratios=[0.5,0.4]", "family.hpcd_components=2",
                                 "family.calibration_samples=4", "family.calibration_seq_len=32",
                                 "family.branch_training.steps=1", "family.branch_training.seq_len=32",
                                 "family.branch_training.batch_size=2"])
    assert result.exit_code == 0, result.output
    assert "eesb-1" in result.output and "hpcd-2" in result.output
    member = load_family_member(fam, "eesb-1")
    model, spec = member.model, member.spec
    assert spec.exit == 2 and model.config.num_hidden_layers == 3
    result = runner.invoke(app, ["family", "info", str(fam)])
    assert result.exit_code == 0 and "hpcd-1" in result.output
    result = runner.invoke(app, ["family", "eval", str(fam), "--samples", "4", "--seq-len", "32", "--members", "eesb-0"])
    assert result.exit_code == 0, result.output
    assert "eesb-0" in result.output and "retention" in result.output


def test_bad_ratio_names_value_and_range(model_dir, tmp_path):
    result = CliRunner().invoke(app, ["family", "build", f"model.name={model_dir}", f"family.dir={tmp_path / 'f'}",
                                      "family.exits=[1]", "family.ratios=[1.5]", "family.calibration_samples=4",
                                      "family.calibration_seq_len=32"])
    assert isinstance(result.exception, AiflowError)
    assert "1.5" in str(result.exception) and "(0, 1]" in str(result.exception)
    assert not (tmp_path / "f").exists()  # nothing half-written
