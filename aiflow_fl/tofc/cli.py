"""``aiflow tofc train | eval | ask | edge``: task-oriented feature compression (paper §II-B1).

Thin wrappers: training and scoring live in :mod:`.system` and :mod:`.evaluate`, the device/edge
runner in :mod:`.runner`. Heavy imports happen inside the commands.
"""

from __future__ import annotations

from typing import Annotated, Optional

import typer

tofc_app = typer.Typer(help="Task-oriented feature compression for device-edge visual question answering.",
                       no_args_is_help=True)

Overrides = Annotated[Optional[list[str]], typer.Argument(help="Config overrides, e.g. tofc.lambdas=[0.01] tofc.member=exit-2")]


def _printer(console):
    return lambda line: console.print(line, markup=False, highlight=False)


@tofc_app.command("train")
def train(
    overrides: Overrides = None,
    retrain: Annotated[bool, typer.Option("--retrain", help="Train again even when this recipe is cached.")] = False,
) -> None:
    """Train the edge projector (member frozen) and one codec per λ on easy-VQA (cached per recipe)."""
    from rich.console import Console

    from aiflow_fl.config import load_config
    from aiflow_fl.tofc.system import model_dir, train_system

    console = Console()
    cfg = load_config(list(overrides or []))
    system = train_system(cfg, _printer(console), retrain=retrain)
    console.print(f"TOFC system ({system.edge.member.name}, λ = {', '.join(f'{k:g}' for k in sorted(system.codecs))}) "
                  f"in {model_dir(cfg)}", markup=False)


@tofc_app.command("eval")
def evaluate(
    overrides: Overrides = None,
    questions: Annotated[int, typer.Option(help="Test questions to score (0: tofc.eval_questions).")] = 0,
) -> None:
    """Accuracy and real bytes per image of each λ, merge-only and uncompressed tokens on easy-VQA test questions."""
    import json

    from rich.console import Console
    from rich.table import Table

    from aiflow_fl.config import load_config
    from aiflow_fl.tofc.system import evaluate_system, load_system

    console = Console()
    cfg = load_config(list(overrides or []))
    system = load_system(cfg)
    points = evaluate_system(system, questions or cfg.tofc.eval_questions, _printer(console))
    table = Table(title=f"TOFC on easy-VQA test ({system.edge.member.name})", title_justify="left")
    for col in ("method", "tokens", "bytes/image", "accuracy"):
        table.add_column(col, justify="left" if col == "method" else "right")
    for p in points:
        table.add_row(p.method, str(p.n_tokens), f"{p.bytes:.1f}", f"{p.accuracy:.3f}")
    console.print(table)
    typer.echo(json.dumps({p.method: [round(p.bytes, 1), round(p.accuracy, 4)] for p in points}))


@tofc_app.command("ask")
def ask(
    image: Annotated[str, typer.Argument(help="An RGB image file (PNG, JPEG, WebP), 64×64 unless --resize.")],
    question: Annotated[str, typer.Argument(help='The question, e.g. "What shape is in the image?"')],
    lam: Annotated[Optional[float], typer.Option("--lambda", help="Which trained codec (default: the smallest λ).")] = None,
    edge_url: Annotated[Optional[str], typer.Option(help="tcp://HOST:PORT of an `aiflow tofc edge` process: the bitstream goes over the socket.")] = None,
    two_process: Annotated[bool, typer.Option("--two-process", help="Start an edge process on loopback for this question.")] = False,
    link_kbps: Annotated[float, typer.Option(help="Uplink rate of the link model, kbit/s.")] = 64.0,
    link_latency_ms: Annotated[float, typer.Option(help="One-way latency of the link model, ms.")] = 5.0,
    resize: Annotated[bool, typer.Option("--resize", help="Resize an image of another size to 64×64.")] = False,
    overrides: Overrides = None,
) -> None:
    """Encode IMAGE on the device side, show the bytes, answer QUESTION on the edge side."""
    import json

    from rich.console import Console

    from aiflow_fl.tofc.runner import ask as run_ask

    console = Console()
    result = run_ask(image, question, lam=lam, two_process=two_process, link_kbps=link_kbps,
                     link_latency_ms=link_latency_ms, overrides=list(overrides or []), resize=resize, edge_url=edge_url)
    console.print(f"device: {result.n_tokens} merged tokens → {result.num_bytes} bytes "
                  f"(model estimate {result.estimated_bits / 8:.1f}), λ={result.lam:g}, {1e3 * result.device_s:.1f} ms",
                  markup=False)
    console.print(f"link:   {result.link_kbps:g} kbit/s → {1e3 * result.link_s:.1f} ms ({result.transport})", markup=False)
    console.print(f"edge:   answer '{result.answer}' (generated: '{result.text}'), {1e3 * result.edge_s:.1f} ms", markup=False)
    console.print(f"latency {1e3 * result.latency_s:.1f} ms", markup=False)
    typer.echo(json.dumps(result.to_dict()))


@tofc_app.command("edge")
def edge(
    port: Annotated[int, typer.Option(help="TCP port on 127.0.0.1 (0: any free one, printed as READY PORT n URL).")] = 0,
    threads: Annotated[int, typer.Option(help="torch threads.")] = 1,
    overrides: Overrides = None,
) -> None:
    """Serve the edge side (decode, project, answer) on loopback for `aiflow tofc ask --edge-url`."""
    import torch

    from aiflow_fl.tofc.runner import load, serve_edge

    torch.set_num_threads(max(1, threads))
    serve_edge(load(list(overrides or [])), port)
