"""Training the family on text: EESB branches (paper §III-B2) and HPCD components (§III-B1).

EESB. One forward of the main model (the backbone) gives the hidden states at every exit; each branch
unit — a branch, or a *partial* branch (a prefix of its factors, one per EESB member with a smaller
ratio at that exit) — runs its decomposed layer on them, then the shared final norm and LM head.

    loss = mean over {main} ∪ S of CE  (+ kl_weight · KL(p_main ‖ p_unit) for each unit in S)

where S is the subset of units trained this step: ``all``, ``random`` (``subset_size`` uniformly),
``sequential`` (round robin) or ``loss_adaptive`` (sampled with probability ∝ each unit's running
loss, so the worst branches get the most steps). With ``accumulate > 1`` several subsets are drawn
for the same batch and their gradients summed (each loss divided by ``accumulate``) before one
optimizer step: all branches trained at the memory cost of a few. The main model is ``frozen``
(its CE is then a constant), adapted by ``lora`` (merged into the backbone afterwards) or trained in
``full``. The embeddings / LM head are shared by every member and stay frozen except in ``full``.

HPCD. Progressive: stage k trains component k of every linear with components < k frozen (and the
ones > k unused), loss = CE + λ·KL(p_teacher ‖ p_student) with the backbone as teacher, λ = 0.4. When
Gram matrices are given, component k is first re-initialised by whitened SVD of the residual left by
the *trained* components < k.

Trained tensors are written back into ``family.tensors``.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from aiflow_fl.errors import AiflowError
from aiflow_fl.family.family import Family
from aiflow_fl.family.spec import LINEAR_NAMES, MemberSpec
from aiflow_fl.family.svd import DecomposedLinear, factorize, rank_for_ratio
from aiflow_fl.layers import head, positions, run_layers

SUBSETS = ("all", "random", "sequential", "loss_adaptive")
MAIN_MODES = ("frozen", "lora", "full")


def lm_loss(logits: torch.Tensor, input_ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean next-token cross-entropy; with a (B, T) ``mask`` only at the positions it marks
    (``logits`` are then the (N, V) logits of exactly those positions, see :func:`loss_positions`)."""
    if mask is not None:
        return F.cross_entropy(logits.float(), input_ids[:, 1:][mask[:, :-1]])
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), input_ids[:, 1:].reshape(-1))


def loss_positions(batch: torch.Tensor | tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, mask) of a training batch: text batches are plain (B, T) ids (every position but the
    last predicts a token); self-distillation batches come with their answer mask
    (:func:`aiflow_fl.family.instructions.padded`)."""
    if isinstance(batch, tuple):
        ids, mask = batch
        if mask[:, -1].any():
            raise AiflowError("A loss mask may not mark the last position of a batch (it has no next token).")
        return ids, mask
    mask = torch.ones_like(batch, dtype=torch.bool)
    mask[:, -1] = False
    return batch, mask


def kl_to_teacher(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """KL(p_teacher ‖ p_student) per token, averaged (the distillation term)."""
    s = F.log_softmax(student_logits.float(), -1)
    t = F.log_softmax(teacher_logits.float(), -1)
    return (t.exp() * (t - s)).sum(-1).mean()


@dataclass
class BranchUnit:
    """A trainable exit: the branch layer of ``exit`` used at ``ranks`` (None: all stored factors)."""

    name: str
    exit: int
    layer: nn.Module
    ranks: dict[str, int] | None

    def set_active(self) -> None:
        for name in LINEAR_NAMES:
            linear = self.layer.get_submodule(name)
            linear.active_rank = None if self.ranks is None else self.ranks[name]


def pick_subset(strategy: str, n_units: int, size: int, step: int, running: list[float], rng: random.Random) -> list[int]:
    """Indices of the units trained in one (sub)step."""
    if strategy not in SUBSETS:
        raise AiflowError(f"family.branch_training.subset is '{strategy}'; allowed: {', '.join(SUBSETS)}.")
    size = max(1, min(size, n_units))
    if strategy == "all":
        return list(range(n_units))
    if strategy == "random":
        return sorted(rng.sample(range(n_units), size))
    if strategy == "sequential":
        return sorted({(step * size + i) % n_units for i in range(size)})
    weights = [max(w, 1e-6) for w in running]
    chosen: list[int] = []
    while len(chosen) < size:
        i = rng.choices(range(n_units), weights=weights)[0]
        if i not in chosen:
            chosen.append(i)
    return sorted(chosen)


def _branch_units(family: Family) -> tuple[list[BranchUnit], dict[int, nn.Module]]:
    """One unit per EESB member (partial branches included), each branch layer built once."""
    layers: dict[int, nn.Module] = {}
    for exit_layer in sorted(family.branch_ranks):
        spec = MemberSpec(f"branch-{exit_layer}", "eesb", exit=exit_layer, ratio=1.0)
        layers[exit_layer] = family.build(spec).model.layers[exit_layer]
    units = []
    members = [s for s in family.members.values() if s.kind == "eesb"]
    if not members:
        raise AiflowError("The family has no EESB members, so there are no branches to train.")
    for spec in members:
        layer = layers[spec.exit]
        stored = family.branch_ranks[spec.exit]
        ranks = {}
        for name in LINEAR_NAMES:
            lin = layer.get_submodule(name)
            ranks[name] = min(stored[name], rank_for_ratio(lin.out_features, lin.in_features, spec.ratio))
        units.append(BranchUnit(spec.name, spec.exit, layer, None if ranks == stored else ranks))
    return units, layers


def train_branches(
    family: Family,
    batches: Iterator[torch.Tensor],
    tcfg,
    show_progress: bool = True,
    time_limit_s: float | None = None,
) -> dict:
    """Train EESB branches (and the main model per ``tcfg.main``) for ``tcfg.steps`` optimizer steps
    (fewer if ``time_limit_s`` of wall time runs out first).

    ``batches`` yields (B, T) token ids; ``tcfg`` is :class:`aiflow_fl.config.BranchTrainingConfig`.
    Returns the loss history per unit (and ``steps_done``).
    """
    import time

    started = time.perf_counter()
    if tcfg.main not in MAIN_MODES:
        raise AiflowError(f"family.branch_training.main is '{tcfg.main}'; allowed: {', '.join(MAIN_MODES)}.")
    if tcfg.accumulate < 1 or tcfg.steps < 0:
        raise AiflowError(f"branch_training.accumulate must be ≥ 1 and steps ≥ 0 (got {tcfg.accumulate}, {tcfg.steps}).")
    main = family.build("full")
    units, branch_layers = _branch_units(family)
    main.requires_grad_(tcfg.main == "full")
    peft_model = None
    if tcfg.main == "lora":
        from peft import LoraConfig, get_peft_model

        targets = sorted({n.split(".")[-1] for n in LINEAR_NAMES})
        peft_model = get_peft_model(main, LoraConfig(r=tcfg.lora_rank, lora_alpha=2 * tcfg.lora_rank, target_modules=targets))
    params = [p for layer in branch_layers.values() for p in layer.parameters()]
    for p in params:
        p.requires_grad_(True)
    params += [p for p in main.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=tcfg.lr, weight_decay=0.0)
    rng = random.Random(0)
    running = [math.log(main.config.vocab_size)] * len(units)
    history: dict[str, list[float]] = {u.name: [] for u in units} | {"main": []}
    main.train()
    from aiflow_fl.progress import progress_bar

    with progress_bar(transient=not show_progress) as progress:
        task = progress.add_task("training branches", total=tcfg.steps)
        steps_done = 0
        for step in range(tcfg.steps):
            if time_limit_s is not None and time.perf_counter() - started > time_limit_s:
                break
            ids, mask = loss_positions(next(batches))
            optimizer.zero_grad(set_to_none=True)
            out = None
            for sub in range(tcfg.accumulate):
                chosen = pick_subset(tcfg.subset, len(units), tcfg.subset_size, step * tcfg.accumulate + sub, running, rng)
                if out is None or tcfg.main != "frozen":  # a frozen main is run once per batch
                    with torch.set_grad_enabled(tcfg.main != "frozen"):
                        out = main(input_ids=ids, output_hidden_states=True, use_cache=False)
                main_ce = lm_loss(out.logits[mask], ids, mask)
                teacher = out.logits.detach()[mask]
                pos = positions(0, ids.shape[1], ids.device)
                losses = [main_ce]
                for i in chosen:
                    unit = units[i]
                    unit.set_active()
                    hidden = out.hidden_states[unit.exit]
                    branch_out = run_layers(main, hidden, 0, 1, pos, layers=[unit.layer])  # type: ignore[arg-type]
                    logits = head(main, branch_out[mask])  # only where the loss is taken
                    ce = lm_loss(logits, ids, mask)
                    loss = ce + (tcfg.kl_weight * kl_to_teacher(logits, teacher) if tcfg.kl_weight > 0 else 0.0)
                    losses.append(loss)
                    running[i] = 0.9 * running[i] + 0.1 * float(ce.detach())
                    history[unit.name].append(float(ce.detach()))
                history["main"].append(float(main_ce.detach()))
                total = torch.stack([torch.as_tensor(x) for x in losses]).mean() / tcfg.accumulate
                if total.requires_grad:
                    total.backward()
            optimizer.step()
            steps_done += 1
            progress.update(task, advance=1, description=f"training branches (unit CE {sum(running) / len(running):.3f})")
    for unit in units:
        unit.ranks = None
        unit.set_active()
    main.eval()
    if peft_model is not None:
        main = peft_model.merge_and_unload()
    _write_back(family, main, branch_layers)
    history["steps_done"] = [float(steps_done)]
    return history


def _write_back(family: Family, main: nn.Module, branch_layers: dict[int, nn.Module]) -> None:
    with torch.no_grad():
        for key, value in main.state_dict().items():
            if key in family.tensors:
                family.tensors[key] = value.detach().clone()
        for exit_layer, layer in branch_layers.items():
            for key, value in layer.state_dict().items():
                store = f"branch.{exit_layer}.{key}"
                if store not in family.tensors:
                    raise AiflowError(f"Trained branch tensor '{store}' has no place in the family store.")
                family.tensors[store] = value.detach().clone()


def train_hpcd(
    family: Family,
    batches: Iterator[torch.Tensor],
    steps: int,
    lr: float = 1e-4,
    kl_weight: float = 0.4,
    grams: dict[str, torch.Tensor] | None = None,
    show_progress: bool = True,
    stages: list[int] | None = None,
) -> dict[str, list[float]]:
    """Progressive HPCD training (see module doc) of stages ``stages`` (default 1..K, in order);
    returns the loss history per stage."""
    from aiflow_fl.progress import progress_bar

    if not family.hpcd_ranks:
        raise AiflowError("The family has no HPCD components (build it with family.kind=hpcd or both).")
    count = len(next(iter(family.hpcd_ranks.values())))
    teacher = family.build("full")
    history: dict[str, list[float]] = {}
    with progress_bar(transient=not show_progress) as progress:
        for k in stages or range(1, count + 1):
            if not 1 <= k <= count:
                raise AiflowError(f"HPCD stage {k} is outside the allowed range 1..{count} (the family's components).")
            if grams is not None and k > 1:
                _reinit_component(family, k - 1, grams)
            spec = family.members.get(f"hpcd-{k}") or MemberSpec(f"hpcd-{k}", "hpcd", exit=family.config.num_hidden_layers, components=k)
            student = family.build(spec)
            student.requires_grad_(False)
            trainable = []
            for module in student.modules():
                if isinstance(module, DecomposedLinear):
                    for p in (module.us[k - 1], module.vs[k - 1]):
                        p.requires_grad_(True)
                        trainable.append(p)
            optimizer = torch.optim.AdamW(trainable, lr=lr, weight_decay=0.0)
            student.train()
            history[spec.name] = []
            task = progress.add_task(f"HPCD stage {k}/{count}", total=steps)
            for _ in range(steps):
                ids = next(batches)
                with torch.no_grad():
                    target = teacher(input_ids=ids, use_cache=False).logits
                logits = student(input_ids=ids, use_cache=False).logits
                ce = lm_loss(logits, ids)
                loss = ce + kl_weight * kl_to_teacher(logits, target)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                history[spec.name].append(float(ce.detach()))
                progress.advance(task)
            student.eval()
            with torch.no_grad():
                for path, module in student.named_modules():
                    if isinstance(module, DecomposedLinear):
                        family.tensors[f"hpcd.{path}.us.{k - 1}"] = module.us[k - 1].detach().clone()
                        family.tensors[f"hpcd.{path}.vs.{k - 1}"] = module.vs[k - 1].detach().clone()
    return history


def _reinit_component(family: Family, c: int, grams: dict[str, torch.Tensor]) -> None:
    """Component ``c`` := whitened SVD of W − Σ_{c'<c} U_c' V_c' (the trained earlier components)."""
    for path, ranks in family.hpcd_ranks.items():
        weight = family.tensors[f"{path}.weight"].double()
        residual = weight - sum(family.tensors[f"hpcd.{path}.us.{j}"].double() @ family.tensors[f"hpcd.{path}.vs.{j}"].double() for j in range(c))
        w_u, w_v = factorize(residual, grams.get(path)).factors(ranks[c], family.tensors[f"{path}.weight"].dtype)
        family.tensors[f"hpcd.{path}.us.{c}"] = w_u
        family.tensors[f"hpcd.{path}.vs.{c}"] = w_v


DATA_SOURCES = ("text", "self")


def branch_batches(model, tokenizer, tcfg, source: str = "pydoc", seed: int = 0, show_progress: bool = True):
    """Endless training batches for :func:`train_branches` per ``tcfg.data``:

    * ``text``: (B, ``tcfg.seq_len``) chunks of the training side of ``source`` (data.source);
    * ``self``: self-distillation — the backbone's own greedy answers (``tcfg.self_max_new_tokens``
      tokens) to ``tcfg.self_prompts`` generic chat instructions (:mod:`aiflow_fl.family.instructions`),
      with the loss on the answer positions only: the data drafts face when serving chat.
    """
    if tcfg.data not in DATA_SOURCES:
        raise AiflowError(f"family.branch_training.data is '{tcfg.data}'; allowed: {', '.join(DATA_SOURCES)}.")
    if tcfg.data == "text":
        from aiflow_fl.family.batches import training_batches

        return training_batches(tokenizer, tcfg.seq_len, tcfg.batch_size, source, seed)
    from aiflow_fl.family.instructions import instructions, self_answers, self_batches

    if tokenizer is None:
        raise AiflowError("family.branch_training.data=self needs the model's tokenizer (to write chat prompts).")
    answers = self_answers(model, tokenizer, instructions(tcfg.self_prompts, seed), tcfg.self_max_new_tokens,
                           show_progress=show_progress)
    return self_batches(answers, tcfg.batch_size, seed)


@torch.inference_mode()
def greedy_agreement(main: nn.Module, exits: dict[str, tuple[int, nn.Module | None]], answers, batch_size: int = 8,
                     vocab: torch.Tensor | None = None) -> dict[str, float]:
    """Teacher-forced greedy agreement of drafts with ``main`` on its own answers: for each
    ``name -> (exit, branch layer or None)``, the fraction of answer positions where
    argmax(norm+head(branch(h_exit))) equals ``main``'s argmax — the per-token acceptance probability
    of greedy speculative decoding when the draft sees the verified prefix (``answers``:
    :class:`aiflow_fl.family.instructions.SelfAnswers`). ``vocab`` restricts the draft head to those
    ids (a reduced draft vocabulary)."""
    from aiflow_fl.family.instructions import padded

    hits = {name: 0 for name in exits}
    total = 0
    for i in range(0, len(answers.sequences), batch_size):
        ids, mask = padded(answers, list(range(i, min(i + batch_size, len(answers.sequences)))))
        out = main(input_ids=ids, output_hidden_states=True, use_cache=False)
        target = out.logits[mask].argmax(-1)
        pos = positions(0, ids.shape[1])
        total += int(target.numel())
        for name, (exit_layer, branch) in exits.items():
            hidden = out.hidden_states[exit_layer]
            if branch is not None:
                hidden = run_layers(main, hidden, 0, 1, pos, layers=[branch])  # type: ignore[arg-type]
            logits = head(main, hidden[mask])
            if vocab is not None:
                guess = vocab[logits[:, vocab].argmax(-1)]
            else:
                guess = logits.argmax(-1)
            hits[name] += int((guess == target).sum())
    return {name: hits[name] / max(1, total) for name in exits}


def family_drafts(family: Family, plain_exits: list[int] = ()) -> dict[str, tuple[int, nn.Module | None]]:
    """:func:`greedy_agreement`'s ``exits`` for every EESB member of ``family`` (its branch at its
    ratio) and plain early exits ``exit-k`` (norm + head on layer k's hidden states)."""
    drafts: dict[str, tuple[int, nn.Module | None]] = {f"exit-{k}": (k, None) for k in plain_exits}
    for name, spec in family.members.items():
        if spec.kind == "eesb":
            drafts[name] = (spec.exit, family.build(name).model.layers[spec.exit])
    return drafts
