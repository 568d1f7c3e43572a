"""Family members: shared layers, branches, HPCD, peft on every member, alignment keys, folder, budget."""

from __future__ import annotations

import json

import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors import safe_open
from safetensors.torch import save_file

from aiflow_fl.config import FamilyConfig
from aiflow_fl.errors import AiflowError
from aiflow_fl.family import (
    DecomposedLinear,
    MemberSpec,
    align_key,
    family_from_backbone,
    head_member,
    load_family_member,
    module_path,
)
from aiflow_fl.family.family import seal_folder
from aiflow_fl.family.budget import budget_from_fraction, exit_and_ratio, explicit_eesb, size_model
from aiflow_fl.family.spec import count_member, skeleton
from aiflow_fl.models import tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")


LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _family(model, tokenizer=None):
    cfg = FamilyConfig(kind="both", exits=[1, 2, 2], ratios=[0.5, 0.3, 0.6], hpcd_components=3, hpcd_ratio=0.15)
    torch.manual_seed(0)
    batches = [torch.randint(0, 500, (2, 24)) for _ in range(2)]
    return family_from_backbone(model, tokenizer, cfg, batches=batches)


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def tiny(request):
    """A tiny random model with a small vocabulary (these tests need no tokenizer): fast on a busy CPU."""
    return tiny_model(request.param, num_layers=4, vocab_size=512)


@pytest.fixture(scope="module")
def family(tiny):
    return _family(tiny)


def test_members_are_real_causal_lms_with_shared_layers(tiny, family):
    assert list(family.members) == ["full", "eesb-0", "eesb-1", "eesb-2", "hpcd-1", "hpcd-2", "hpcd-3"]
    ids = torch.randint(0, 500, (1, 11))
    with torch.no_grad():
        reference = tiny(ids, output_hidden_states=True)
        for name in ["eesb-0", "eesb-1", "eesb-2"]:
            spec = family.spec(name)
            member = family.build(name)
            assert member.config.num_hidden_layers == spec.exit + 1
            assert isinstance(member.model.layers[spec.exit].self_attn.q_proj, DecomposedLinear)
            out = member(ids, labels=ids, output_hidden_states=True)
            assert torch.isfinite(out.loss)
            # aligned features: hidden states after layers < exit equal the backbone's exactly
            for i in range(spec.exit + 1):
                torch.testing.assert_close(out.hidden_states[i], reference.hidden_states[i], atol=0, rtol=0)
            if name == "eesb-2":  # KV cache generation equals no-cache greedy decoding (transformers' generate)
                cached = member.generate(ids, max_new_tokens=6, do_sample=False, use_cache=True)
                plain = member.generate(ids, max_new_tokens=6, do_sample=False, use_cache=False)
                assert torch.equal(cached, plain)
        full = family.build("full")
        torch.testing.assert_close(full(ids).logits, reference.logits, atol=0, rtol=0)


def test_partial_branch_is_a_prefix_of_the_stored_factors(family):
    small, large = family.build("eesb-1"), family.build("eesb-2")  # same exit 2, ratios 0.3 < 0.6
    assert family.branch_ranks[2]["self_attn.q_proj"] == large.model.layers[2].self_attn.q_proj.rank
    for name in ["self_attn.q_proj", "mlp.down_proj"]:
        s, l = small.model.layers[2].get_submodule(name), large.model.layers[2].get_submodule(name)
        h = s.rank
        assert h < l.rank
        torch.testing.assert_close(s.us[0], l.us[0][:, :h])
        torch.testing.assert_close(s.vs[0], l.vs[0][:h])
    assert family.spec("eesb-1").num_parameters < family.spec("eesb-2").num_parameters


def test_hpcd_member_k_is_the_sum_of_its_first_k_components(tiny, family):
    x = torch.randn(5, tiny.config.hidden_size)
    errors = []
    for k in (1, 2, 3):
        member = family.build(f"hpcd-{k}")
        q = member.model.layers[1].self_attn.q_proj
        assert len(q.us) == k
        expected = sum(family.tensors[f"hpcd.model.layers.1.self_attn.q_proj.us.{c}"]
                       @ family.tensors[f"hpcd.model.layers.1.self_attn.q_proj.vs.{c}"] for c in range(k))
        torch.testing.assert_close(q.weight, expected)
        real = tiny.model.layers[1].self_attn.q_proj.weight.detach()
        errors.append(float((x @ (real - q.weight).T).norm()))
    assert errors[0] > errors[1] > errors[2]
    counts = [family.spec(f"hpcd-{k}").num_parameters for k in (1, 2, 3)]
    assert counts[0] < counts[1] < counts[2]


@pytest.mark.parametrize("name", ["eesb-2", "hpcd-2"])
def test_peft_lora_with_backbone_target_names_works_on_every_member(family, name):
    member = family.build(name)
    ids = torch.randint(0, 500, (2, 9))
    peft_model = get_peft_model(member, LoraConfig(r=4, lora_alpha=8, target_modules=LORA_TARGETS))
    wrapped = [n for n, m in peft_model.named_modules() if hasattr(m, "lora_A") and hasattr(m, "base_layer")]
    assert len(wrapped) == 7 * member.config.num_hidden_layers  # every linear, decomposed ones included
    loss = peft_model(ids, labels=ids).loss
    loss.backward()
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    grads = [p.grad for n, p in peft_model.named_parameters() if "lora_B" in n]
    assert all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)


def test_alignment_keys_and_inverse(family):
    layers = family.config.num_hidden_layers
    eesb = family.spec("eesb-2")  # exit 2
    assert align_key(eesb, "model.layers.1.self_attn.q_proj") == "model.layers.1.self_attn.q_proj"
    assert align_key(eesb, "base_model.model.model.layers.2.mlp.down_proj") == "branch.2.mlp.down_proj"
    assert align_key(family.spec("full"), "model.layers.2.mlp.down_proj") == "model.layers.2.mlp.down_proj"
    assert align_key(family.spec("hpcd-1"), "model.layers.3.self_attn.v_proj") == "model.layers.3.self_attn.v_proj"
    # the branch never aliases the real layer of a deeper member
    assert module_path(family.spec("full"), "branch.2.mlp.down_proj", layers) is None
    assert module_path(family.spec("eesb-0"), "branch.2.mlp.down_proj", layers) is None
    assert module_path(family.spec("eesb-0"), "model.layers.2.mlp.down_proj", layers) is None
    # the round trip covers every linear of every member
    for spec in family.members.values():
        member = family.build(spec.name)
        for path, module in member.named_modules():
            if isinstance(module, torch.nn.Linear) and path != "lm_head":
                assert module_path(spec, align_key(spec, path), layers) == path
        keys = {align_key(spec, p) for p, m in member.named_modules() if isinstance(m, torch.nn.Linear)}
        assert len(keys) == sum(isinstance(m, torch.nn.Linear) for m in member.modules())


def test_save_and_load_member_reads_only_its_tensors(tiny, tokenizer, tmp_path):
    family = _family(tiny)
    family.tokenizer = tokenizer
    folder = family.save(tmp_path / "fam")
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folder left
    ids = torch.randint(0, 500, (1, 7))
    for name in ["full", "eesb-1", "hpcd-2"]:
        member = load_family_member(folder, name)
        model, tok, spec = member.model, member.tokenizer, member.spec
        assert spec == family.spec(name) and tok.eos_token_id == tokenizer.eos_token_id
        with torch.no_grad():
            torch.testing.assert_close(model(ids).logits, family.build(name)(ids).logits, atol=1e-5, rtol=1e-5)
    description = json.loads((folder / "family.json").read_text())
    assert {m["name"] for m in description["members"]} == set(family.members)
    # A device's download: keep only what eesb-0 (exit 1) needs. It still loads; deeper members fail clearly.
    with safe_open(str(folder / "tensors.safetensors"), "pt") as fh:
        kept = {k: fh.get_tensor(k) for k in fh.keys()
                if k.startswith("branch.1.") or not (k.startswith(("branch.", "hpcd.", "model.layers.")))
                or k.startswith("model.layers.0.")}
    save_file(kept, str(folder / "tensors.safetensors"))
    seal_folder(folder)  # the download comes with the digests of what it holds
    model = load_family_member(folder, "eesb-0").model
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, family.build("eesb-0")(ids).logits, atol=1e-5, rtol=1e-5)
    for name in ["full", "eesb-2", "hpcd-1"]:
        with pytest.raises(AiflowError, match="lacks"):
            load_family_member(folder, name)
    # a mismatched tensor is named
    kept["model.layers.0.self_attn.q_proj.weight"] = torch.zeros(3, 3)
    save_file(kept, str(folder / "tensors.safetensors"))
    seal_folder(folder)  # consistent digests, wrong shapes: the shape check names the tensor
    with pytest.raises(AiflowError, match="model.layers.0.self_attn.q_proj.weight"):
        load_family_member(folder, "eesb-0")
    with pytest.raises(AiflowError, match="no member 'eesb-9'"):
        load_family_member(folder, "eesb-9")
    with pytest.raises(AiflowError, match="not a family folder"):
        load_family_member(tmp_path, "full")


def test_budget_picks_last_exit_that_fits_and_fills_it(tiny):
    sizes = size_model(tiny.config)
    full = skeleton(tiny.config, MemberSpec("full", "full", exit=4), {})
    assert count_member(full)[0] == sizes.total == sum(p.numel() for p in tiny.parameters())
    for budget in [sizes.minimum, sizes.fixed + 2 * sizes.layer + sizes.branch(0.3), sizes.total - 1]:
        exit_layer, ratio = exit_and_ratio(sizes, budget)
        used = sizes.eesb(exit_layer, ratio)
        assert used <= budget
        # it is the last exit that fits, and one more rank on every linear would not fit
        assert exit_layer == sizes.num_layers - 1 or sizes.eesb(exit_layer + 1, 1e-9) > budget
        step = sum(m + n for m, n, _ in sizes.linears.values())
        assert ratio == 1.0 or budget - used < step
    exit_layer, ratio = exit_and_ratio(sizes, sizes.fixed + 2 * sizes.layer + sizes.branch(0.3))
    assert exit_layer == 2 and abs(sizes.branch(ratio) - sizes.branch(0.3)) < sum(m + n for m, n, _ in sizes.linears.values())


def test_built_member_size_matches_the_size_model(tiny, family):
    sizes = size_model(tiny.config)
    spec = family.spec("eesb-1")
    assert spec.num_parameters == sizes.eesb(spec.exit, spec.ratio)


@pytest.mark.parametrize(
    "call, words",
    [
        (lambda s: exit_and_ratio(s, s.minimum - 1), ["allowed range", "embeddings"]),
        (lambda s: exit_and_ratio(s, s.total), ["allowed range", "full"]),
        (lambda s: budget_from_fraction(s, 1.5), ["1.5", "(0, 1)"]),
        (lambda s: explicit_eesb(s, 4, 0.5), ["Exit layer 4", "0..3"]),
        (lambda s: explicit_eesb(s, -1, 0.5), ["Exit layer -1", "0..3"]),
        (lambda s: explicit_eesb(s, 1, 0.0), ["0.0", "(0, 1]"]),
        (lambda s: explicit_eesb(s, 1, 1.2), ["1.2", "(0, 1]"]),
    ],
)

def test_bad_budgets_exits_ratios_name_value_and_range(tiny, call, words):
    with pytest.raises(AiflowError) as info:
        call(size_model(tiny.config))
    for word in words:
        assert word in str(info.value)


def test_unsupported_architecture_and_bad_head_exit(tiny, family):
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=100))
    with pytest.raises(AiflowError, match="Unsupported architecture 'gpt2'"):
        family_from_backbone(gpt2, None, FamilyConfig())
    with pytest.raises(AiflowError, match="0..4"):
        head_member(family, 5)
    head = family.build(head_member(family, 2))
    assert head.config.num_hidden_layers == 2
