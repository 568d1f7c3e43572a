"""A family folder can be trusted: a truncated, a bit-flipped and an unsealed family are refused by every
command that loads one (family info / eval, generate, serve, a device's member) with one paragraph naming
the file and what to rebuild; files get the user's umask."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from aiflow_fl.cli import app
from aiflow_fl.config import FamilyConfig, load_config
from aiflow_fl.errors import AiflowError
from aiflow_fl.family.family import MANIFEST, TENSORS, family_from_backbone
from aiflow_fl.family.member import load_family_member, member_from_config
from aiflow_fl.files import atomic_write_bytes
from aiflow_fl.models import tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def good(tmp_path_factory, tokenizer) -> Path:
    model = tiny_model("llama", num_layers=3, vocab_size=49152, hidden_size=32)
    batches = [torch.randint(3, 500, (2, 16), generator=torch.Generator().manual_seed(i)) for i in range(2)]
    family = family_from_backbone(model, tokenizer, FamilyConfig(kind="eesb", exits=[1], ratios=[0.5]), batches=batches)
    return family.save(tmp_path_factory.mktemp("families") / "good")


def _copy(good: Path, where: Path, name: str) -> Path:
    folder = where / name
    shutil.copytree(good, folder)
    return folder


def _truncated(good: Path, where: Path) -> Path:
    folder = _copy(good, where, "truncated")
    data = (folder / TENSORS).read_bytes()
    (folder / TENSORS).write_bytes(data[: len(data) // 2])
    return folder


def _bit_flipped(good: Path, where: Path) -> Path:
    """Same size, one bit of one weight flipped (the copy loads and would answer: only the digest tells)."""
    folder = _copy(good, where, "flipped")
    data = bytearray((folder / TENSORS).read_bytes())
    data[len(data) - 1000] ^= 0x01
    (folder / TENSORS).write_bytes(bytes(data))
    return folder


def _unsealed(good: Path, where: Path) -> Path:
    folder = _copy(good, where, "unsealed")
    (folder / MANIFEST).unlink()
    return folder


BROKEN = {"truncated": (_truncated, ["tensors.safetensors", "does not match the SHA-256", "aiflow family build"]),
          "flipped": (_bit_flipped, ["tensors.safetensors", "does not match the SHA-256", "aiflow family build"]),
          "unsealed": (_unsealed, ["no valid sha256.json", "aiflow family build"])}


@pytest.fixture(scope="module", params=sorted(BROKEN))
def broken(request, good, tmp_path_factory) -> tuple[Path, list[str]]:
    make, words = BROKEN[request.param]
    return make(good, tmp_path_factory.mktemp(request.param)), words


def _refused(result, words: list[str]) -> None:
    assert isinstance(result.exception, AiflowError), result.output
    for word in words:
        assert word in str(result.exception), str(result.exception)


def test_a_good_family_loads_and_its_files_have_the_users_umask(good):
    member = load_family_member(good, "eesb-0")
    assert member.kind == "eesb" and member.exit_layer == 1
    result = CliRunner().invoke(app, ["family", "info", str(good)])
    assert result.exit_code == 0, result.output
    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE(good.stat().st_mode) == 0o777 & ~mask  # mkdtemp would give 0700
    for name in (TENSORS, MANIFEST, "family.json"):
        assert stat.S_IMODE((good / name).stat().st_mode) == 0o666 & ~mask, name  # mkstemp would give 0600


def test_every_command_refuses_a_broken_family(broken, tokenizer):
    folder, words = broken
    runner = CliRunner()
    _refused(runner.invoke(app, ["family", "info", str(folder)]), words)
    _refused(runner.invoke(app, ["family", "eval", str(folder), "--samples", "2", "--seq-len", "16"]), words)
    _refused(runner.invoke(app, ["generate", "hello", "--family", str(folder), "--tiers", "device,edge",
                                 "serving.members=[eesb-0,full]", "serving.max_new_tokens=2"]), words)
    _refused(runner.invoke(app, ["serve", "--tier", "edge", "--family", str(folder), "--member", "full"]), words)
    with pytest.raises(AiflowError) as info:  # a device's member (clients/, the server's evaluation)
        member_from_config(load_config([f"family.dir={folder}"]), "eesb-0")
    assert all(word in str(info.value) for word in words)


def test_the_command_line_prints_one_paragraph_and_exits_2(good, tmp_path):
    folder = _truncated(good, tmp_path)
    done = subprocess.run([sys.executable, "-m", "aiflow_fl.cli", "family", "info", str(folder)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "aiflow: error: The family folder" in done.stderr and "Traceback" not in done.stderr
    assert f"{TENSORS} does not match" in done.stderr


def test_a_repaired_family_loads_again(good, tmp_path):
    """Verification is cached per process only while the files stay the same: fixing a folder works."""
    folder = _bit_flipped(good, tmp_path)
    with pytest.raises(AiflowError, match="damaged"):
        load_family_member(folder, "full")
    atomic_write_bytes(folder / TENSORS, (good / TENSORS).read_bytes())
    assert load_family_member(folder, "full").kind == "full"


def test_atomic_writes_get_the_users_umask(tmp_path):
    """Checkpoints, metrics and plots go through atomic_write_bytes: not mkstemp's 0600."""
    mask = os.umask(0o027)
    try:
        atomic_write_bytes(tmp_path / "checkpoint.bin", b"x")
    finally:
        os.umask(mask)
    assert stat.S_IMODE((tmp_path / "checkpoint.bin").stat().st_mode) == 0o640
