"""``aiflow family build | info | eval``. Heavy imports happen inside the commands."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

family_app = typer.Typer(help="Build, inspect and evaluate familial models (EESB / HPCD).", no_args_is_help=True)


def _members_table(rows: list[dict], title: str, extra: list[str] = ()):  # type: ignore[assignment]
    """Members as a table that stays readable in 80 columns (parameters in millions; with ``extra``
    columns, the memory columns give way to them)."""
    from rich.table import Table

    table = Table(title=title, title_justify="left")
    base = ["member", "kind", "exit/k", "ratio", "params M", "% params"]
    if extra:
        base.remove("kind")  # the member's name says it; the figures need the room
    columns = [*base, *extra] if extra else [*base, "MiB", "% block"]
    for col in columns:
        table.add_column(col, no_wrap=col == "member", justify="left" if col in ("member", "kind") else "right")
    for r in rows:
        where = r["components"] if r["kind"] == "hpcd" else r["exit"]
        cells = [r["name"], *([] if extra else [r["kind"]]), str(where), f"{r['ratio']:.3f}", f"{r['num_parameters'] / 1e6:.1f}",
                 f"{100 * r['params_fraction']:.1f}"]
        cells += [str(r.get(c, "")) for c in extra] if extra else [f"{r['num_bytes'] / 2**20:.1f}", f"{100 * r['block_params_fraction']:.1f}"]
        table.add_row(*cells)
    return table


def build_family(cfg, console=None):
    """Calibrate, decompose, train what the config asks for, save; returns the saved Family."""
    import time

    from aiflow_fl.family.batches import training_batches
    from aiflow_fl.family.family import family_from_backbone
    from aiflow_fl.family.train import branch_batches, train_branches, train_hpcd
    from aiflow_fl.models import load_backbone

    from rich.console import Console

    from aiflow_fl.progress import stage

    console = console or Console()
    start = time.perf_counter()
    with stage(f"loading the backbone {cfg.model.name}", console):
        loaded = load_backbone(cfg.model.name)
    with stage(f"calibration ({cfg.family.calibration_samples} sequences) and whitened-SVD decomposition", console):
        family = family_from_backbone(loaded.model, loaded.tokenizer, cfg.family)
    tcfg = cfg.family.branch_training
    if tcfg.steps > 0 and any(s.kind == "eesb" for s in family.members.values()):
        with stage(f"branch training ({tcfg.steps} steps, data={tcfg.data})", console):
            batches = branch_batches(loaded.model, loaded.tokenizer, tcfg, cfg.data.source, cfg.run.seed)
            train_branches(family, batches, tcfg)
    if tcfg.hpcd_steps > 0 and family.hpcd_ranks:
        with stage(f"HPCD component training ({tcfg.hpcd_steps} steps per component)", console):
            batches = training_batches(loaded.tokenizer, tcfg.seq_len, tcfg.batch_size, cfg.data.source, cfg.run.seed)
            train_hpcd(family, batches, tcfg.hpcd_steps, tcfg.lr, tcfg.hpcd_kl_weight, grams=family.grams)
    family.info["total_build_s"] = round(time.perf_counter() - start, 2)
    with stage(f"saving the family to {cfg.family.dir}", console):
        folder = family.save(cfg.family.dir)
    console.print(_members_table(family.describe(), f"family saved to {folder}"))
    console.print(f"built in {family.info['total_build_s']:.1f} s")
    return family


@family_app.command("build")
def build(
    overrides: Annotated[Optional[list[str]], typer.Argument(help="Config overrides, e.g. family.budgets=[0.4,0.6] family.kind=both")] = None,
) -> None:
    """Calibrate, decompose (whitened SVD), optionally train branches / HPCD components, save the family."""
    from rich.console import Console

    from aiflow_fl.config import load_config

    build_family(load_config(overrides), Console())


@family_app.command("info")
def info(folder: Annotated[str, typer.Argument(help="A family folder written by `aiflow family build`.")]) -> None:
    """Members, parameters and memory of a family folder."""
    from pathlib import Path

    from rich.console import Console

    from aiflow_fl.family.family import TENSORS, describe_folder

    description = describe_folder(folder)
    members = description["members"]
    full = next(m for m in members if m["kind"] == "full")
    rows = [m | {"params_fraction": m["num_parameters"] / full["num_parameters"],
                 "block_params_fraction": m["block_parameters"] / full["block_parameters"]} for m in members]
    console = Console()
    console.print(_members_table(rows, f"family {folder} (backbone {description.get('backbone') or '?'}, {description['num_layers']} layers)"))
    size = (Path(folder) / TENSORS).stat().st_size
    console.print(f"tensors file: {size / 2**20:.1f} MiB; info: {description.get('info', {})}")


@family_app.command("eval")
def evaluate(
    folder: Annotated[str, typer.Argument(help="A family folder written by `aiflow family build`.")],
    samples: Annotated[int, typer.Option(help="Held-out pydoc chunks to evaluate on.")] = 32,
    seq_len: Annotated[int, typer.Option(help="Tokens per chunk.")] = 128,
    members: Annotated[Optional[str], typer.Option(help="Comma-separated member names (default: all).")] = None,
) -> None:
    """Perplexity, top-1 accuracy and retention (top-1 / the full member's) of members on held-out text."""
    from rich.console import Console

    from aiflow_fl.family.batches import heldout_batches
    from aiflow_fl.family.evaluate import evaluate_lm
    from aiflow_fl.family.family import describe_folder
    from aiflow_fl.family.member import load_family_member

    description = describe_folder(folder)
    names = [m["name"] for m in description["members"]]
    chosen = names if members is None else [n.strip() for n in members.split(",")]
    chosen = ["full"] + [n for n in chosen if n != "full"]
    rows, full_top1 = [], None
    batches = None
    for name in chosen:
        member = load_family_member(folder, name)
        spec = member.spec
        if batches is None:
            batches = heldout_batches(member.tokenizer, seq_len, 4, samples)
        scores = evaluate_lm(member.model, batches)
        full_top1 = scores["top1_acc"] if full_top1 is None else full_top1
        full = next(m for m in description["members"] if m["kind"] == "full")
        rows.append(spec.to_dict() | {
            "params_fraction": spec.num_parameters / full["num_parameters"],
            "block_params_fraction": spec.block_parameters / full["block_parameters"],
            "ppl": f"{scores['ppl']:.2f}", "top1": f"{scores['top1_acc']:.3f}",
            "retention": f"{scores['top1_acc'] / full_top1:.3f}",
        })
    Console().print(_members_table(rows, f"family {folder} on held-out pydoc text", ["ppl", "top1", "retention"]))
