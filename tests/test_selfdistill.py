"""Self-distillation data for branch training: instructions, the backbone's own answers (checked
against transformers' generate), answer masks, the training option and the agreement measure."""

from __future__ import annotations

import pytest
import torch

from aiflow_fl.config import BranchTrainingConfig, FamilyConfig, load_config
from aiflow_fl.errors import AiflowError
from aiflow_fl.family import family_from_backbone
from aiflow_fl.family.instructions import instructions, padded, self_answers, self_batches, task_instructions
from aiflow_fl.family.train import branch_batches, kl_to_teacher, family_drafts, greedy_agreement, loss_positions, train_branches
from aiflow_fl.generation import chat_input_ids
from aiflow_fl.models import tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama", num_layers=3, hidden_size=32).eval()


def test_instructions_are_varied_deterministic_and_hold_out_the_benchmark():
    from aiflow_fl.bench import _load

    specdec = _load("specdec")

    items = instructions()
    assert len(items) > 500 and len(set(items)) == len(items)
    assert instructions(10) == items[:10] and instructions(10, seed=1) != items[:10]
    assert not set(specdec.PROMPTS) & set(items)
    assert not any(word in item.lower() for item in items for word in ("sleep", "bicycle", "climate change", "tea "))
    with pytest.raises(AiflowError):
        instructions(-1)
    tasks = task_instructions()  # the draft head's other categories: held out the same way, none an everyday one
    assert len(tasks) > 200 and len(set(tasks)) == len(tasks) and task_instructions(5) == tasks[:5]
    assert not set(specdec.PROMPTS) & set(tasks) and not set(items) & set(tasks)
    assert not any(word in item.lower() for item in tasks for word in ("sleep", "bicycle", "climate change", "tea ", "palindrome"))
    with pytest.raises(AiflowError):
        task_instructions(-1)


def test_self_answers_equal_generate_and_are_cached(model, tokenizer, tmp_path, monkeypatch):
    monkeypatch.setenv("AIFLOW_CACHE", str(tmp_path))
    prompts = ["Explain rainbows.", "Give three tips about chess, please, in detail.", "Hi"]
    answers = self_answers(model, tokenizer, prompts, max_new_tokens=6, batch_size=2, show_progress=False)
    for prompt, seq, start in zip(prompts, answers.sequences, answers.prompt_lens):
        ids = chat_input_ids(tokenizer, prompt)
        assert torch.equal(seq[:start], ids[0])
        with torch.inference_mode():
            reference = model.generate(ids, max_new_tokens=6, do_sample=False, eos_token_id=2, pad_token_id=2)
        assert seq[start:].tolist() == reference[0, ids.shape[1]:].tolist()[: len(seq) - start]
    assert len(list((tmp_path / "selfdistill").glob("*.pt"))) == 1
    again = self_answers(model, tokenizer, prompts, max_new_tokens=6, batch_size=2, show_progress=False)
    assert all(torch.equal(a, b) for a, b in zip(again.sequences, answers.sequences))
    other = tiny_model("llama", num_layers=3, hidden_size=32, seed=1)
    self_answers(other, tokenizer, prompts, max_new_tokens=6, batch_size=2, show_progress=False)
    assert len(list((tmp_path / "selfdistill").glob("*.pt"))) == 2  # keyed by the weights too


def test_answer_mask_marks_the_positions_predicting_answer_tokens():
    from aiflow_fl.family.instructions import SelfAnswers

    answers = SelfAnswers([torch.tensor([5, 6, 7, 8, 9]), torch.tensor([1, 2, 3])], [3, 1])
    ids, mask = padded(answers, [0, 1])
    assert ids.tolist() == [[5, 6, 7, 8, 9], [1, 2, 3, 0, 0]]
    # row 0: answer 8, 9 predicted at positions 2, 3; row 1: answer 2, 3 at positions 0, 1
    assert mask.tolist() == [[False, False, True, True, False], [True, True, False, False, False]]
    batch = next(self_batches(answers, 2))
    assert loss_positions(batch)[1].sum() == 4
    text_ids, text_mask = loss_positions(torch.zeros(2, 4, dtype=torch.long))
    assert text_mask.sum() == 6 and not text_mask[:, -1].any()


def test_greedy_agreement_matches_member_forward(model):
    torch.manual_seed(0)
    from aiflow_fl.family.instructions import SelfAnswers

    seqs = [torch.randint(3, 400, (n,)) for n in (12, 9)]
    answers = SelfAnswers(seqs, [4, 5])
    family = family_from_backbone(model, None, FamilyConfig(kind="eesb", exits=[1, 2], ratios=[0.5, 1.0]),
                                  batches=[torch.randint(0, 400, (2, 16))])
    drafts = family_drafts(family, plain_exits=[1])
    got = greedy_agreement(model, drafts | {"last": (3, None)}, answers)
    assert got["last"] == 1.0  # the full model's own head agrees with itself
    # independent reference: each member's own forward vs the full model's forward, answer positions only
    for name in ("eesb-0", "eesb-1"):
        member = family.build(name).eval()
        hits = total = 0
        for seq, start in zip(seqs, answers.prompt_lens):
            with torch.inference_mode():
                a = member(input_ids=seq[None]).logits[0, start - 1:-1].argmax(-1)
                b = model(input_ids=seq[None]).logits[0, start - 1:-1].argmax(-1)
            hits, total = hits + int((a == b).sum()), total + len(a)
        assert got[name] == pytest.approx(hits / total)


def test_self_distillation_training_moves_branches_toward_the_teacher(tokenizer, tmp_path, monkeypatch):
    monkeypatch.setenv("AIFLOW_CACHE", str(tmp_path))
    model = tiny_model("llama", num_layers=3, hidden_size=32).eval()
    with torch.no_grad():  # sharper logits, so the exit disagrees with the teacher as a trained model's does
        model.model.norm.weight.mul_(8.0)
    family = family_from_backbone(model, tokenizer, FamilyConfig(kind="eesb", exits=[1], ratios=[0.5]),
                                  batches=[torch.randint(0, 400, (2, 16))])
    # a random teacher is nearly uniform, so CE on its argmax would pull away from it: KL dominates here
    tcfg = BranchTrainingConfig(steps=25, lr=3e-3, batch_size=4, kl_weight=50.0, data="self", self_prompts=8,
                                self_max_new_tokens=8)
    answers = self_answers(model, tokenizer, instructions(8), 8, show_progress=False)

    def answer_kl() -> float:  # KL(teacher ‖ member) on the answer positions, by whole-model forwards
        member = family.build("eesb-0").eval()
        ids, mask = padded(answers, list(range(len(answers.sequences))))
        with torch.inference_mode():
            return float(kl_to_teacher(member(input_ids=ids).logits[mask], model(input_ids=ids).logits[mask]))

    before = answer_kl()
    history = train_branches(family, branch_batches(model, tokenizer, tcfg, show_progress=False), tcfg, show_progress=False)
    assert history["steps_done"] == [25.0]
    assert answer_kl() < 0.5 * before
    with pytest.raises(AiflowError, match="allowed: text, self"):
        branch_batches(model, tokenizer, BranchTrainingConfig(data="web"))
    with pytest.raises(AiflowError):
        load_config(["family.branch_training.data=web"])


def test_family_build_cli_with_self_distillation(tiny_llama_dir, tmp_path, monkeypatch):
    """`aiflow family build family.branch_training.data=self` generates, caches and trains on self answers."""
    from typer.testing import CliRunner

    from aiflow_fl.cli import app
    from aiflow_fl.family import load_family

    monkeypatch.setenv("AIFLOW_CACHE", str(tmp_path / "cache"))
    fam = tmp_path / "fam"
    result = CliRunner().invoke(app, ["family", "build", f"model.name={tiny_llama_dir}", f"family.dir={fam}",
                                      "family.exits=[1]", "family.ratios=[0.5]", "family.calibration_samples=4",
                                      "family.calibration_seq_len=32", "family.branch_training.steps=2",
                                      "family.branch_training.data=self", "family.branch_training.self_prompts=4",
                                      "family.branch_training.self_max_new_tokens=4", "family.branch_training.batch_size=2"])
    assert result.exit_code == 0, result.output
    assert len(list((tmp_path / "cache" / "selfdistill").glob("*.pt"))) == 1
    assert any(k.startswith("branch.1.") for k in load_family(fam).tensors)
