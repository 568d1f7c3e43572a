"""``aiflow demo``: the main job end to end on the embedded default model (README's first command).

1. **Build a family** from SmolLM2-135M-Instruct: whitened-SVD calibration, EESB members with
   decomposed branches, a short branch training with KL to the backbone.
2. **Fine-tune it federatedly**: Flower's simulation engine, devices under edges each train *their*
   member with LoRA on a Dirichlet partition of the Python reference; edges merge with FlexLoRA, the
   cloud merges the edges; held-out loss/accuracy per round; checkpoints and a plot in the run folder.
3. **Serve the trained family**: the federated update is folded into every member (aligned keys, so
   the shared layers stay identical), then hierarchical speculative decoding answers a few prompts —
   device = smallest member drafts, edge = larger member and cloud = full model verify — checked token
   for token against the cloud member's own ``generate``.

Everything lands in one folder (``run.dir``, default ``runs/demo-<UTC time>``); the last output line is
one JSON object with the figures.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

from aiflow_fl.config import AiflowConfig, load_config
from aiflow_fl.errors import AiflowError

PROMPTS = (
    "What is the capital of France?",
    "Give me three tips for writing clear Python functions.",
    "Explain what a list comprehension is in one sentence.",
)


def _chain_names(cfg: AiflowConfig) -> list[str]:
    """device = the smallest EESB member drafts, edge = the largest verifies, cloud = the full model."""
    from aiflow_fl.family.family import describe_folder

    eesb = sorted((m for m in describe_folder(cfg.family.dir)["members"] if m["kind"] == "eesb"), key=lambda m: m["exit"])
    return [eesb[0]["name"], eesb[-1]["name"], "full"]


def _trained_members(cfg: AiflowConfig, names: list[str], run_dir: Path):
    """Members ``names`` of the family with the federation's trained update folded into their weights."""
    from aiflow_fl.family.member import member_from_config
    from aiflow_fl.federated.run import fold_run_update

    members = [member_from_config(cfg, name) for name in names]
    fold_run_update(members, run_dir)
    for member in members:
        member.model.eval()
    return members, members[-1].tokenizer


def _reference_tokens(cfg: AiflowConfig, run_dir: Path) -> tuple[list[list[int]], list[float]]:
    """The trained cloud member's own greedy ``generate()`` answers to PROMPTS: what lossless serving must
    reproduce token for token (and how fast plain transformers decoding is, for the table)."""
    from aiflow_fl.generation import chat_input_ids
    from aiflow_fl.serving.build import eos_ids

    (cloud,), tokenizer = _trained_members(cfg, ["full"], run_dir)
    eos = eos_ids(cloud.model, tokenizer)
    answers, speeds = [], []
    for prompt in PROMPTS:
        ids = chat_input_ids(tokenizer, prompt)
        with torch.inference_mode():
            start = time.perf_counter()
            out = cloud.model.generate(ids, max_new_tokens=cfg.serving.max_new_tokens, do_sample=False,
                                       eos_token_id=eos, pad_token_id=eos[0])
            seconds = time.perf_counter() - start
        answers.append(out[0, ids.shape[1]:].tolist())
        speeds.append(len(answers[-1]) / seconds)
    return answers, speeds


def serve_trained_family(cfg: AiflowConfig, run_dir: Path, console: Console) -> dict[str, Any]:
    """Step 3a: start ``aiflow serve`` (the OpenAI-compatible server) on the family with the federation's
    update folded in (``serving.adapter=RUN_DIR``), and ask PROMPTS through the official ``openai``
    client twice: of the 3-tier hierarchical speculative chain (device drafts, edge and cloud verify)
    and of the cloud member alone. Lossless = the chain's token ids equal the trained cloud member's
    own transformers ``generate()``; tokens/s are measured by the client around each request."""
    import openai

    from aiflow_fl.serving.api import launch

    names = _chain_names(cfg)
    chain_name = ">".join(names)
    with stage_line(console, "reference: the trained cloud member's own generate() (transformers, greedy)"):
        references, generate_tps = _reference_tokens(cfg, run_dir)
    log = run_dir / "serve.log"
    n = cfg.serving.max_new_tokens
    rows, per_model = [], {chain_name: [0, 0.0], "full": [0, 0.0]}
    lossless = True
    acceptance: list[float] = []
    console.print(f"starting `aiflow serve` on the trained family, chain {chain_name} (server log: {log})")
    sv = cfg.serving  # the run's serving settings (recipe: demo), not the server's defaults
    settings = [f"serving.{k}={getattr(sv, k)}" for k in ("draft_len", "adaptive", "cost_aware", "draft_confidence",
                                                          "cloud_block", "probe_every", "probe_budget", "reuse", "min_draft_len", "max_draft_len")]
    with launch(cfg.family.dir, f"serving.adapter={run_dir}", f"serving.chains=[{chain_name}]", *settings, log=log) as server:
        client = openai.OpenAI(base_url=server.base_url, api_key="none", max_retries=0, timeout=300)

        def ask(model: str, prompt: str) -> tuple[list[int], str, float, dict]:
            start = time.perf_counter()
            reply = client.chat.completions.create(model=model, messages=[{"role": "user", "content": prompt}],
                                                   max_tokens=n, temperature=0)
            seconds = time.perf_counter() - start
            extra = (reply.model_extra or {}).get("aiflow") or {}
            return list(extra.get("token_ids", [])), reply.choices[0].message.content or "", seconds, extra

        for model in (chain_name, "full"):  # warm-up: first requests pay one-off costs (not timed)
            ask(model, "Hi")
        for prompt, reference in zip(PROMPTS, references):
            chain_ids, answer, chain_s, extra = ask(chain_name, prompt)
            cloud_ids, _, cloud_s, _ = ask("full", prompt)
            same = chain_ids == reference and cloud_ids == reference
            lossless &= same
            for model, ids, seconds in ((chain_name, chain_ids, chain_s), ("full", cloud_ids, cloud_s)):
                per_model[model][0] += len(ids)
                per_model[model][1] += seconds
            links = extra.get("links", [])
            rate = links[0]["acceptance_rate"] if links else 0.0
            acceptance.append(rate)
            rows.append((prompt, answer.strip(), same, len(chain_ids) / chain_s, len(cloud_ids) / cloud_s, rate))
    _print_serving(console, rows, chain_name, "aiflow serve + openai client")
    chain_tps = per_model[chain_name][0] / per_model[chain_name][1]
    cloud_tps = per_model["full"][0] / per_model["full"][1]
    figures = {
        "serving_via": "aiflow serve (OpenAI-compatible) + openai client",
        "serving_tiers": names,
        "serving_lossless": lossless,
        "serving_chain_tokens_per_s": round(chain_tps, 2),
        "serving_cloud_only_tokens_per_s": round(cloud_tps, 2),
        "serving_generate_tokens_per_s": round(sum(generate_tps) / len(generate_tps), 2),
        "serving_device_acceptance": round(sum(acceptance) / len(acceptance), 3),
    }
    figures["serving_plot"] = str(plot_serving(rows, chain_name, run_dir / "serving.png",
                                               "aiflow serve + openai client (client-measured)"))
    return figures


def _print_serving(console: Console, rows: list[tuple], chain_name: str, how: str) -> None:
    table = Table(title=f"{how}: {chain_name} vs full", caption="tok/s: chain vs the cloud member alone")
    for column, width in (("prompt", 18), ("answer", 24), ("same", 4), ("chain", 6), ("cloud", 6), ("accept", 6)):
        table.add_column(column, overflow="fold", max_width=width)
    for prompt, answer, same, chain_tps, cloud_tps, rate in rows:
        table.add_row(prompt, answer[:120] + ("..." if len(answer) > 120 else ""), "yes" if same else "NO",
                      f"{chain_tps:.1f}", f"{cloud_tps:.1f}", f"{rate:.0%}")
    console.print(table)


def stage_line(console: Console, text: str):
    from aiflow_fl.progress import stage

    return stage(text, console)


def plot_serving(rows: list[tuple], chain_name: str, path: Path, how: str) -> Path:
    """Tokens/s per prompt, chain vs cloud member alone (one small PNG); ``how`` names where they ran."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.2))
    x = range(len(rows))
    ax.bar([i - 0.2 for i in x], [r[3] for r in rows], 0.4, label=f"chain {chain_name}")
    ax.bar([i + 0.2 for i in x], [r[4] for r in rows], 0.4, label="cloud member alone (full)")
    ax.set_xticks(list(x), [f"prompt {i + 1}\n{'lossless' if r[2] else 'DIFFERS'}" for i, r in enumerate(rows)])
    ax.set_ylabel("tokens/s")
    ax.set_title(f"serving the trained family: {how}", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


COLLAB_QUESTION = "How do I write a for loop over a dictionary in Python?"
# Every specialist takes part (threshold 0, top 2 of the 2 edges): the demo shows their exchange, and the
# routing scores are printed beside it. With the default threshold (0.5, semantic-router's for MiniLM) a
# question far from both edges' derived descriptions goes to the general member alone.
COLLAB_OVERRIDES = ["collab.threshold=0.0", "collab.top_k=2"]


def collaboration_round(run_dir: Path, console: Console) -> dict[str, Any]:
    """One collaboration round between the edges' federated specialists (saved with the run by
    ``collab.save_specialists``): route the question, the selected specialists answer in parallel, a
    synthesis, one broadcast-and-revise round (:func:`aiflow_fl.collab.session.collaboration_round`)."""
    from aiflow_fl.collab.session import collaboration_round as one_round

    try:
        result = one_round(run_dir, COLLAB_QUESTION, COLLAB_OVERRIDES)
    except AiflowError as exc:
        console.print(f"[yellow]collaboration round did not run: {exc}[/yellow]")
        return {"collab_answered": False, "collab_note": str(exc)}
    scores = ", ".join(f"{n} {v:.2f}" for n, v in result["routing"]["scores"].items())
    console.print(f"[bold]Q:[/bold] {COLLAB_QUESTION}\nrouting (cosine, threshold {result['routing']['threshold']}): {scores}; "
                  f"selected: {', '.join(result['routing']['selected']) or 'none'}")
    for name, text in result["answers"].items():  # one paragraph each (a weak member's blank lines would run on)
        console.print(f"[bold]{name}[/bold]: {' '.join(text.split())[:200] or '(no text)'}")
    console.print(f"[bold]A[/bold] ({result['note']}): {result['answer'].strip()[:400]}")
    # answered: a specialist replied with some text and the synthesis is not empty (an empty reply is no answer)
    return {"collab_answered": any(t.strip() for t in result["answers"].values()) and bool(result["answer"].strip()),
            "collab_specialists": sorted(result["answers"]), "collab_note": result["note"],
            "collab_s": result["timings_s"].get("total"), "collab_bytes": int(sum(result["bytes"].values()))}


# A demo-sized TOFC recipe (~2 min on 2 cores, cached): the bench's default recipe trains longer.
# members as early exits of the backbone, not of the demo's family: an empty family.dir ('' — a bare
# "family.dir=" would be None, which a str field refuses)
NO_FAMILY = "family.dir=''"
TOFC_DEMO_OVERRIDES = [NO_FAMILY, "tofc.projector_steps=120", "tofc.codec_warmup_steps=60", "tofc.codec_steps=10",
                       "tofc.lambdas=[0.003]"]
TOFC_DEMO_IMAGES = 6


def tofc_question(console: Console, system=None) -> dict[str, Any]:
    """TOFC questions about easy-VQA test images (``aiflow_fl.tofc.runner.ask``): the device encodes,
    merges and range-codes, the bitstream's real bytes cross the link model, the edge member answers.
    Uses the default recipe's system when ``aiflow tofc train`` / ``aiflow bench tofc`` cached one, else
    trains the demo-sized recipe above (cached). Prints each answer next to the truth and to the bytes
    WebP needs for the same image at quality 10. ``system``: a TOFC system to use instead (tests)."""
    from aiflow_fl.tofc.data import image_variant
    from aiflow_fl.tofc.runner import ask
    from aiflow_fl.tofc.system import _test_split, eval_questions, load_system, train_system

    recipe = "given"
    try:
        if system is None:
            try:
                system, recipe = load_system(load_config([NO_FAMILY])), "default"
                if not system.codecs:
                    raise AiflowError("no codec")
            except AiflowError:
                say = lambda line: console.print(f"tofc: {line}", markup=False, highlight=False)  # noqa: E731
                system, recipe = train_system(load_config(TOFC_DEMO_OVERRIDES), say), "demo-sized"
    except AiflowError as exc:
        console.print(f"[yellow]TOFC question skipped: {exc}[/yellow]")
        return {"tofc_bytes": None, "tofc_note": f"skipped: {exc}"}
    split = _test_split()
    rows = eval_questions(split, TOFC_DEMO_IMAGES, seed=1).tolist()
    results, right = [], 0
    for q in rows:
        image = split.images[int(split.image_index[q])]
        result = ask(image, split.questions[q], system=system)
        truth = system.edge.answers[int(split.answers[q])]
        webp = int(image_variant(image[None], "webp-10")[1][0])
        right += result.answer == truth
        results.append(result)
        console.print(f"{split.questions[q]} → [bold]{result.answer}[/bold] (truth {truth}); {result.num_bytes} bytes "
                      f"(WebP q10: {webp}), {1e3 * result.latency_s:.0f} ms at 64 kbit/s", highlight=False)
    note = f"{recipe} recipe, λ={results[0].lam:g}, {right}/{len(rows)} right"
    console.print(f"TOFC: {note}")
    return {"tofc_bytes": round(sum(r.num_bytes for r in results) / len(results), 1), "tofc_correct": right,
            "tofc_asked": len(rows), "tofc_note": note}


def gains_beyond_noise(figures: dict[str, Any]) -> dict[str, bool]:
    """Per member: did held-out accuracy rise by more than the half-width of the paired-bootstrap 95 %
    interval of after - before (issue #17's bar; ``heldout_acc_delta/M`` and ``..._ci95/M`` from
    :func:`aiflow_fl.federated.run.summarize`)?"""
    out = {}
    for key, delta in figures.items():
        if key.startswith("heldout_acc_delta/"):
            member = key.split("/", 1)[1]
            low, high = figures[f"heldout_acc_delta_ci95/{member}"]
            out[member] = bool(delta > (high - low) / 2)
    return out


# The modules `aiflow family build` runs (aiflow_fl.family.cli.build_family and what it imports): an edit
# to any of them builds the demo's family again. Serving-side modules of the package (member.py,
# feature_draft.py, evaluate.py, split.py) do not change the folder and are left out.
_FAMILY_BUILD_SOURCES = (
    "family/cli.py", "family/family.py", "family/svd.py", "family/spec.py", "family/train.py", "family/batches.py",
    "family/budget.py", "family/instructions.py", "data/sources.py", "data/partition.py", "layers.py", "models.py",
)


def family_cache_key(cfg: AiflowConfig) -> str:
    """What a built family depends on: the backbone, the family and branch-training settings, the data
    the branches distil on, the seed, and the source of the code that builds it (so an edit to the
    build invalidates the cache). ``family.dir`` is where it goes, not what it is: left out."""
    import hashlib

    family = {k: v for k, v in dataclasses.asdict(cfg.family).items() if k != "dir"}
    what = {"model": cfg.model.name, "family": family, "data_source": cfg.data.source, "seed": cfg.run.seed}
    digest = hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode())
    package = Path(__file__).resolve().parent
    for source in _FAMILY_BUILD_SOURCES:
        digest.update(source.encode() + b"\0" + (package / source).read_bytes())
    return digest.hexdigest()[:16]


def cached_family(cfg: AiflowConfig, console: Console, rebuild: bool = False) -> tuple[Path, bool]:
    """The demo's family folder: reused from ``$AIFLOW_CACHE/families/<model>-<key>`` when a family of
    exactly this config and build code is there and passes its SHA-256 check, else built there.
    Returns (folder, reused)."""
    from aiflow_fl.family.cli import build_family
    from aiflow_fl.family.family import DESCRIPTION, verify_folder
    from aiflow_fl.models import cache_dir

    folder = cache_dir() / "families" / f"{cfg.model.name}-{family_cache_key(cfg)}"
    if not rebuild and (folder / DESCRIPTION).is_file():
        try:
            verify_folder(folder)
            info = json.loads((folder / DESCRIPTION).read_text()).get("info", {})
            console.print(f"reusing the family built earlier with this exact config ({folder}; its build took "
                          f"{info.get('total_build_s', '?')} s). `aiflow demo --rebuild-family` builds it again.")
            return folder, True
        except AiflowError as exc:
            console.print(f"[yellow]the cached family cannot be used ({exc}); building it again[/yellow]")
    build_family(dataclasses.replace(cfg, family=dataclasses.replace(cfg.family, dir=str(folder))), console)
    return folder, False


def run_demo(overrides: list[str], rebuild_family: bool = False) -> dict[str, Any]:
    from aiflow_fl.federated.run import print_summary, summarize
    from simulations.run import simulate

    console = Console()
    start = time.perf_counter()
    cfg = load_config(["recipe=demo", *overrides])
    root = Path(cfg.run.dir or f"runs/demo-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}").resolve()
    cfg = dataclasses.replace(
        cfg,
        family=dataclasses.replace(cfg.family, dir=str(root / "family")),
        run=dataclasses.replace(cfg.run, dir=str(root / "federated")),
    )
    seconds: dict[str, Any] = {}
    console.rule(f"[bold]1/3 the family of {cfg.model.name}[/bold] -> {cfg.family.dir}")
    t = time.perf_counter()
    folder, reused = cached_family(cfg, console, rebuild_family)
    root.mkdir(parents=True, exist_ok=True)
    link = Path(cfg.family.dir)
    if link.is_symlink():
        link.unlink()
    elif link.exists():
        raise AiflowError(f"{root} already holds a family folder ({link}); give the demo a new run.dir.")
    link.symlink_to(folder, target_is_directory=True)  # the run folder names the family it used
    seconds["family_s"] = round(time.perf_counter() - t, 1)
    seconds["family_reused"] = reused

    where = (f"{cfg.federation.num_devices} devices -> {cfg.federation.num_edges} edges -> cloud" if cfg.hierarchy.enabled
             else f"{cfg.federation.num_devices} devices -> server")
    console.rule(f"[bold]2/3 federated fine-tuning[/bold]: {where}, {cfg.federation.rounds} rounds, {cfg.strategy}")
    t = time.perf_counter()
    summary = simulate(cfg)
    figures = print_summary(summarize(summary.run_dir), "federated fine-tuning of the family")
    seconds["federated_s"] = round(time.perf_counter() - t, 1)
    beyond = gains_beyond_noise(figures)
    for member, ok in beyond.items():
        low, high = figures[f"heldout_acc_delta_ci95/{member}"]
        console.print(f"{member}: held-out accuracy {figures[f'heldout_acc_before/{member}']:.4f} -> "
                      f"{figures[f'heldout_acc_after/{member}']:.4f}, change {figures[f'heldout_acc_delta/{member}']:+.4f} "
                      f"(95 % [{low:+.4f}, {high:+.4f}], half-width {(high - low) / 2:.4f}): "
                      + ("[green]a gain beyond the noise[/green]" if ok else "[red]NOT beyond the noise[/red]"))

    console.rule("[bold]3/3 serve the trained family[/bold]: hierarchical speculative decoding, collaboration, TOFC")
    t = time.perf_counter()
    # A fresh process: the simulation engine leaves threads behind in this one that slow the
    # Python-side decoding loop several-fold, which would make the serving timings meaningless.
    subprocess.run([sys.executable, "-m", "aiflow_fl.demo", str(summary.run_dir)], check=True)
    served = json.loads((Path(summary.run_dir) / "serving.json").read_text())
    seconds["serve_stage_s"] = round(time.perf_counter() - t, 1)
    result = {**seconds,
              **{k: v for k, v in figures.items() if isinstance(v, (int, float, str, bool, list))},
              "heldout_acc_gain_beyond_noise": beyond, **served,
              "total_s": round(time.perf_counter() - start, 1), "run_dir": str(root)}
    (root / "demo.json").write_text(json.dumps(result, indent=1))
    console.print(f"Everything is in {root}: family/, federated/ (metrics.jsonl, eval/, checkpoints/, summary.png), demo.json")
    print(json.dumps(result), flush=True)
    return result


def serve_stage(run_dir: Path, console: Console) -> dict[str, Any]:
    """Step 3 (in its own process, see :func:`run_demo`): the API + chain, a collaboration round, TOFC."""
    from aiflow_fl.progress import stage

    run_cfg = load_config(config_file=run_dir / "config.yaml")
    seconds: dict[str, float] = {}
    t = time.perf_counter()
    with stage("hierarchical speculative decoding on the trained family", console):
        serving = serve_trained_family(run_cfg, run_dir, console)
    seconds["serving_s"] = round(time.perf_counter() - t, 1)
    t = time.perf_counter()
    with stage("one collaboration round between the edges' specialists", console):
        collab = collaboration_round(run_dir, console)
    seconds["collab_stage_s"] = round(time.perf_counter() - t, 1)
    t = time.perf_counter()
    with stage("one TOFC question about an image", console):
        tofc = tofc_question(console)
    seconds["tofc_stage_s"] = round(time.perf_counter() - t, 1)
    return {**serving, **collab, **tofc, **seconds}


if __name__ == "__main__":  # step 3 on its own: python -m aiflow_fl.demo FEDERATED_RUN_DIR
    run_dir = Path(sys.argv[1])
    (run_dir / "serving.json").write_text(json.dumps(serve_stage(run_dir, Console())))
