"""Multi-process tiers: real `aiflow serve` processes on 127.0.0.1, bounded in time and always stopped."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from test_specdec import one_thread, reference, scrambled  # noqa: F401  (one_thread: autouse fixture)

from aiflow_fl.config import load_config
from aiflow_fl.errors import AiflowError
from aiflow_fl.serving.api.main import start as start_server
from aiflow_fl.serving.api.main import stop as stop_server
from aiflow_fl.serving.commands import build_chain, check_tiers, parse_remote
from aiflow_fl.family.member import early_exit_member


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tokenizer):
    folder = tmp_path_factory.mktemp("tiny-backbone")
    model = scrambled("llama", vocab=49152)  # the real tokenizer's vocabulary: the CLI test chats with it
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def servers(model_dir):
    """An edge (early exit at layer 4) and a cloud (full model) server, stopped at the end."""
    started = []
    try:
        for args in (["--tier", "edge", "--model", str(model_dir), "--exit", "4"], ["--tier", "cloud", "--model", str(model_dir)]):
            started.append(start_server(args + ["--threads", "1"], timeout_s=120))
        yield {"edge": started[0].url, "cloud": started[1].url, "procs": [s.proc for s in started]}
    finally:
        for server in started:
            stop_server(server.proc)


def config(model_dir, *extra: str):
    return load_config([f"model.name={model_dir}", "serving.exits=[2,4]", "serving.timeout_s=20", *extra])


@pytest.mark.timeout(300)
def test_remote_chains_equal_generate_of_last_verifier(model_dir, servers):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    edge_model = early_exit_member(model, "exit-4").model
    ids = torch.randint(3, 500, (1, 9), generator=torch.Generator().manual_seed(2))
    # familial reuse is a property of chains whose last tier may resume from hidden states: cost-aware
    # drafting (the default) makes the last tier read token ids so it can decode alone (checked below)
    for reuse in (True, False):
        cfg = config(model_dir, f"serving.reuse={reuse}", "serving.draft_len=3", "serving.cloud_block=4", "serving.exits=[2]",
                     "serving.cost_aware=false")
        chain, _ = build_chain(cfg, ["device", "edge"], remote={"edge": servers["edge"]})
        assert chain.generate(ids, 20).tokens == reference(edge_model, ids, 20)
        assert chain.slots[1].tier.entry == (2 if reuse else 0)
        cfg = config(model_dir, f"serving.reuse={reuse}", "serving.draft_len=3", "serving.cloud_block=4", "serving.cost_aware=false")
        chain, _ = build_chain(cfg, ["device", "edge", "cloud"], remote={"edge": servers["edge"], "cloud": servers["cloud"]})
        result = chain.generate(ids, 20)
        assert result.tokens == reference(model, ids, 20), reuse
        sent = chain.slots[2].tier.bytes_sent
        assert sent > 0 and (sent > 20 * 4 * model.config.hidden_size) == reuse  # hidden states vs token ids
    default, _ = build_chain(config(model_dir, "serving.exits=[2]"), ["device", "edge"], remote={"edge": servers["edge"]})
    assert default.cost_aware and default.slots[1].tier.entry == 0  # the remote last tier can decode alone
    assert default.generate(ids, 20).tokens == reference(edge_model, ids, 20)
    # sampling: the remote verifier's probabilities cross the wire as float32, so with the same seed
    # the multi-process chain samples exactly what the in-process one does (fixed draft lengths: cost-aware
    # ones follow each run's measured timings, so the random stream would be drawn in other rounds)
    sampled = config(model_dir, "serving.temperature=1.0", "serving.seed=3", "serving.exits=[2]", "serving.cost_aware=false")
    local, _ = build_chain(sampled, ["device", "cloud"])
    remote_chain, _ = build_chain(sampled, ["device", "cloud"], remote={"cloud": servers["cloud"]})
    assert remote_chain.generate(ids, 12).tokens == local.generate(ids, 12).tokens
    pipelined, _ = build_chain(config(model_dir, "serving.pipelined=true", "serving.draft_len=3", "serving.exits=[2]"), ["device", "cloud"],
                               remote={"cloud": servers["cloud"]})
    assert pipelined.generate(ids, 20).tokens == reference(model, ids, 20)


@pytest.mark.timeout(300)
def test_frozen_or_dead_verifier_degrades_to_device_only(model_dir, servers):  # policy: device
    """A verifier that stops answering (SIGSTOP) or is gone: warning, device-only output, no hang."""
    ids = torch.randint(3, 500, (1, 9), generator=torch.Generator().manual_seed(5))
    cfg = config(model_dir, "serving.timeout_s=2", "serving.exits=[2]", "serving.draft_len=3", "serving.on_verifier_loss=device")
    server = start_server(["--tier", "edge", "--model", str(model_dir), "--exit", "4", "--threads", "1"], timeout_s=120)
    proc, url = server.proc, server.url
    try:
        chain, _ = build_chain(cfg, ["device", "edge"], remote={"edge": url})
        os.kill(proc.pid, signal.SIGSTOP)
        start = time.monotonic()
        with pytest.warns(UserWarning, match="unavailable"):
            result = chain.generate(ids, 12)
        assert time.monotonic() - start < 30
        assert len(result.tokens) == 12 and len(chain.slots) == 1 and result.stats["warnings"]
        os.kill(proc.pid, signal.SIGCONT)
    finally:
        stop_server(proc)
    with pytest.warns(UserWarning, match="skipping the edge tier"):  # gone before the start: skipped
        chain, _ = build_chain(cfg, ["device", "edge"], remote={"edge": url})
    assert len(chain.slots) == 1 and len(chain.generate(ids, 5).tokens) == 5
    chain, _ = build_chain(cfg, ["device", "edge"], remote={"edge": servers["edge"]})
    os.kill(servers["procs"][0].pid, signal.SIGSTOP)  # dies during generation
    try:
        with pytest.warns(UserWarning, match="unavailable"):
            assert len(chain.generate(ids, 12).tokens) == 12
    finally:
        os.kill(servers["procs"][0].pid, signal.SIGCONT)


@pytest.mark.timeout(300)
def test_cli_generate_streams_and_prints_stats(model_dir, servers):
    command = [sys.executable, "-m", "aiflow_fl.cli", "generate", "--model", str(model_dir), "--exits", "2",
               "--tiers", "device,cloud", "--remote", f"cloud={servers['cloud']}", "Hello there", "serving.max_new_tokens=8"]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "accepted" in proc.stderr and "tokens/s" in proc.stderr and "cloud" in proc.stderr
    bad = subprocess.run([sys.executable, "-m", "aiflow_fl.cli", "generate", "--tiers", "edge,device", "x"],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr and "'device' first" in bad.stderr


def test_tier_and_remote_parsing():
    assert check_tiers(["device", "cloud"]) == ["device", "cloud"]
    for bad in (["edge"], ["device", "cloud", "edge"], ["device", "device"], ["device", "fog"]):
        with pytest.raises(AiflowError, match="not a chain"):
            check_tiers(bad)
    assert parse_remote(["edge=http://127.0.0.1:1"]) == {"edge": "http://127.0.0.1:1"}
    with pytest.raises(AiflowError, match="edge=URL"):
        parse_remote(["device=http://x:1"])
