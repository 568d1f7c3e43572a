"""Foundation: config, backbone loading, split-layer primitive, CLI errors, bench harness."""

from __future__ import annotations

import copy
import json
import shutil
import subprocess
import sys

import pytest
import torch
from transformers import DynamicCache

from aiflow_fl.config import flatten, from_run_config, load_config
from aiflow_fl.errors import AiflowError
from aiflow_fl.layers import embed, head, onednn_linear_available, positions, run_layers
from aiflow_fl.models import DEFAULT_MODEL, cache_dir, count_parameters, load_backbone

AIFLOW = [sys.executable, "-m", "aiflow_fl.cli"]


def test_overrides_are_typed_and_roundtrip_through_flower_run_config():
    cfg = load_config(["federation.rounds=5", "strategy=flexlora", "family.budgets=[0.2,0.4]"])
    assert cfg.federation.rounds == 5 and cfg.strategy == "flexlora" and cfg.family.budgets == [0.2, 0.4]
    flat = flatten(cfg)
    assert flat["federation.rounds"] == 5
    assert from_run_config(flat) == cfg


@pytest.mark.parametrize(
    "override, words",
    [
        ("federation.round=5", ["federation.round", "federation.rounds"]),
        ("strategy=flexloraa", ["strategy", "flexlora", "fedit"]),
        ("federation.rounds=abc", ["federation.rounds", "abc"]),
        ("nosuchsection.x=1", ["nosuchsection", "federation"]),
        ("federation.rounds", ["key=value"]),
    ],
)
def test_bad_config_names_the_key_and_allowed_values(override, words):
    with pytest.raises(AiflowError) as info:
        load_config([override])
    for word in words:
        assert word in str(info.value)


def test_run_layers_split_equals_one_forward(tiny):
    """Layers [0,k) then [k,L), across two calls with a KV cache, equal one full forward."""
    ids = torch.randint(0, 1000, (1, 12))
    with torch.no_grad():
        reference = tiny(ids).logits
        cache = DynamicCache(config=tiny.config)
        parts = []
        for lo, hi in [(0, 7), (7, 12)]:
            pos = positions(lo, hi - lo)
            hidden = run_layers(tiny, embed(tiny, ids[:, lo:hi]), 0, 2, pos, cache)
            hidden = run_layers(tiny, hidden, 2, tiny.config.num_hidden_layers, pos, cache)
            parts.append(head(tiny, hidden))
    torch.testing.assert_close(torch.cat(parts, 1), reference, atol=1e-5, rtol=1e-5)


def test_row_adaptive_head_equals_nn_linear_and_transformers_generate(tiny):
    """The LM head's 1-row and few-row kernels give nn.Linear's logits (float summation order aside),
    keep tied weights tied, follow in-place weight changes, leave training on nn.Linear's path, and
    generate() answers exactly as before."""
    from aiflow_fl.layers import RowAdaptiveHead, use_inference_kernels

    ids = torch.randint(3, 500, (1, 7), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        before = tiny.generate(ids, max_new_tokens=12, do_sample=False)
    plain = torch.nn.Linear(tiny.config.hidden_size, tiny.config.vocab_size, bias=False)
    plain.weight = tiny.lm_head.weight
    use_inference_kernels(tiny)
    use_inference_kernels(tiny)  # idempotent
    head = tiny.lm_head
    assert isinstance(head, RowAdaptiveHead) and not isinstance(head.weight, RowAdaptiveHead)
    assert head.weight is tiny.get_input_embeddings().weight or not tiny.config.tie_word_embeddings
    with torch.no_grad():
        for shape in [(1, 1, head.in_features), (1, 4, head.in_features), (2, 2, head.in_features), (1, 9, head.in_features)]:
            x = torch.randn(shape)
            assert torch.allclose(head(x), plain(x), atol=1e-5), shape
        x = torch.randn(1, 1, head.in_features)
        head.weight.mul_(2.0)  # the transposed copy is refreshed after an in-place change
        assert torch.allclose(head(x), plain(x), atol=1e-5)
        head.weight.mul_(0.5)
    with torch.inference_mode():
        assert torch.equal(tiny.generate(ids, max_new_tokens=12, do_sample=False), before)
    x = torch.randn(1, 1, head.in_features, requires_grad=True)
    head(x).sum().backward()  # training: nn.Linear's path, gradients reach the shared weight
    assert head.weight.grad is not None and x.grad is not None


@pytest.mark.skipif(not onednn_linear_available(), reason="this torch has no oneDNN linear")
def test_packed_linear_equals_nn_linear_and_follows_weight_changes(tiny):
    """Packed large linears give nn.Linear's outputs at every row count (few rows on nn.Linear's own
    path), refresh after an in-place change or a new tensor, and leave gradients to nn.Linear; the
    model's forward stays its own."""
    from aiflow_fl.layers import PackedLinear, pack_linears

    ids = torch.randint(3, 500, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = tiny(ids).logits
    weights = {n: m.weight for n, m in tiny.named_modules() if type(m) is torch.nn.Linear and n != "lm_head"}
    packed = pack_linears(tiny, min_weight=1)
    assert packed == len(weights) and pack_linears(tiny, min_weight=1) == 0  # idempotent
    assert all(isinstance(m, PackedLinear) and m.weight is weights[n]
               for n, m in tiny.named_modules() if n in weights)
    with torch.no_grad():
        torch.testing.assert_close(tiny(ids).logits, reference, atol=1e-4, rtol=1e-4)
    layer = next(m for m in tiny.modules() if isinstance(m, PackedLinear))
    plain = torch.nn.Linear(layer.in_features, layer.out_features, bias=True)
    layer.bias = plain.bias
    plain.weight = layer.weight
    with torch.no_grad():
        for rows in (1, 4, 5, 9, 40):
            x = torch.randn(rows, layer.in_features)
            torch.testing.assert_close(layer(x), plain(x), atol=1e-5, rtol=1e-5)
        x = torch.randn(2, 6, layer.in_features)
        layer.weight.mul_(3.0)  # in place: the version counter moves, the packed copy follows
        torch.testing.assert_close(layer(x), plain(x), atol=1e-5, rtol=1e-5)
        layer.weight.data = layer.weight.data * 0.5  # a new tensor (peft's safe merge)
        torch.testing.assert_close(layer(x), plain(x), atol=1e-5, rtol=1e-5)
        copied = copy.deepcopy(tiny)  # Member.fresh_copy deep-copies: the packed caches stay behind
        torch.testing.assert_close(copied(ids).logits, tiny(ids).logits, atol=1e-5, rtol=1e-5)
    x = torch.randn(6, layer.in_features, requires_grad=True)
    layer(x).sum().backward()
    assert x.grad is not None and layer.weight.grad is not None


def test_cli_bad_key_is_one_paragraph_not_a_traceback():
    proc = subprocess.run([*AIFLOW, "config", "federation.round=3"], capture_output=True, text=True)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert "Did you mean 'federation.rounds'" in proc.stderr


def test_unknown_model_is_a_clear_error(tmp_path):
    with pytest.raises(AiflowError, match="no config.json"):
        load_backbone(str(tmp_path))
    proc = subprocess.run(
        [*AIFLOW, "model", "info", "no-such-org/no-such-model"],
        capture_output=True, text=True, env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"},
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "no-such-org/no-such-model" in proc.stderr and DEFAULT_MODEL in proc.stderr


def test_bench_harness_lists_and_rejects_unknown():
    from aiflow_fl.bench import available, run_benchmark

    assert "smoke" in available()
    with pytest.raises(AiflowError, match="smoke"):
        run_benchmark("no-such-bench", quick=True)


def test_benchmarks_import_under_a_name_opacus_does_not_take(tmp_path):
    """opacus installs a top-level ``benchmarks`` package; ours is ``aiflow_benchmarks`` (the folder
    benchmarks/), importable by name in a fresh interpreter started elsewhere."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
    code = "import aiflow_benchmarks.smoke as m, aiflow_fl.bench as b; print(m.__file__); print(b._load('smoke') is m)"
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == [str(root / "benchmarks" / "smoke.py"), "True"]


@pytest.mark.slow
def test_embedded_default_answers_like_transformers_generate():
    """The cached safetensors model is the GGUF model: same greedy tokens as loading the GGUF directly."""
    from transformers import AutoModelForCausalLM

    from aiflow_fl.generation import chat_input_ids
    from aiflow_fl.models import embedded_gguf_path

    loaded = load_backbone(DEFAULT_MODEL)
    assert loaded.model.config.num_hidden_layers == 30
    assert count_parameters(loaded.model) == 134_515_008
    ids = chat_input_ids(loaded.tokenizer, "What is the capital of France?")
    with torch.inference_mode():
        ours = loaded.model.generate(ids, max_new_tokens=12, do_sample=False)
    answer = loaded.tokenizer.decode(ours[0, ids.shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer
    gguf = embedded_gguf_path(DEFAULT_MODEL)
    direct = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    with torch.inference_mode():
        reference = direct.generate(ids, max_new_tokens=12, do_sample=False)
    assert torch.equal(ours, reference)


@pytest.mark.slow
def test_corrupt_cache_is_rebuilt_not_reused(tmp_path, monkeypatch):
    load_backbone(DEFAULT_MODEL)  # make sure the shared cache exists
    source = cache_dir() / "models" / DEFAULT_MODEL
    monkeypatch.setenv("AIFLOW_CACHE", str(tmp_path))
    target = tmp_path / "models" / DEFAULT_MODEL
    shutil.copytree(source, target)
    weights = target / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2 : len(data) // 2 + 64] = b"\xff" * 64  # silent corruption inside a tensor
    weights.write_bytes(bytes(data))
    with pytest.warns(UserWarning, match="corrupt"):
        loaded = load_backbone(DEFAULT_MODEL)
    manifest = json.loads((target / "aiflow_cache.json").read_text())
    assert manifest["sha256"] != "" and weights.read_bytes() != bytes(data)
    assert loaded.model.config.num_hidden_layers == 30


def test_adapter_update_roundtrips_through_peft_and_flower_records():
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict

    from aiflow_fl.aggregation import from_peft_state_dict
    from aiflow_fl.models import tiny_model
    from aiflow_fl.protocol import arrays_to_update, update_to_arrays

    model = get_peft_model(tiny_model(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p)
    update = from_peft_state_dict(get_peft_model_state_dict(model), alpha=8, num_examples=3)
    assert len(update.layers) == 2 * model.config.num_hidden_layers
    back = arrays_to_update(update_to_arrays(update), num_examples=3)
    for key, f in update.layers.items():
        torch.testing.assert_close(back.layers[key].delta(), f.delta())
        # peft's own forward uses ΔW = (alpha/r)·B@A on the same module.
        lora_module = model.get_submodule(f"base_model.model.{key}")
        ref = lora_module.scaling["default"] * lora_module.lora_B["default"].weight @ lora_module.lora_A["default"].weight
        torch.testing.assert_close(f.delta(), ref)
