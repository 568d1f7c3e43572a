"""The ``aiflow`` command line.

Heavy imports (torch, transformers, flwr) happen inside commands so ``aiflow --help`` stays fast.
An :class:`AiflowError` is printed as one paragraph with exit code 2; other exceptions are bugs and
keep their traceback.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from aiflow_fl.errors import AiflowError

app = typer.Typer(
    help="aiflow-fl: federated and edge-continual learning of familial LLMs.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
model_app = typer.Typer(help="Inspect backbone models.", no_args_is_help=True)
app.add_typer(model_app, name="model")
from aiflow_fl.family.cli import family_app  # noqa: E402  (typer only; the family code loads lazily)

app.add_typer(family_app, name="family")
from aiflow_fl.tofc.cli import tofc_app  # noqa: E402  (typer only; torch loads inside the commands)

app.add_typer(tofc_app, name="tofc")

Overrides = Annotated[
    Optional[list[str]],
    typer.Argument(help="Config overrides as key=value (e.g. federation.rounds=5 strategy=flexlora)."),
]


@model_app.command("info")
def model_info(
    model: Annotated[str, typer.Argument(help="Embedded name, local folder or cached Hugging Face id.")] = "smollm2-135m-instruct",
) -> None:
    """Architecture, layers, parameters and load time of a model."""
    from rich.console import Console
    from rich.table import Table

    from aiflow_fl.models import count_parameters, load_backbone

    loaded = load_backbone(model)
    cfg = loaded.model.config
    table = Table(title=f"model {model}")
    table.add_column("field")
    table.add_column("value")
    rows = {
        "architecture": type(loaded.model).__name__,
        "model_type": cfg.model_type,
        "layers": cfg.num_hidden_layers,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": getattr(cfg, "intermediate_size", "?"),
        "heads / kv heads": f"{cfg.num_attention_heads} / {getattr(cfg, 'num_key_value_heads', '?')}",
        "vocab": cfg.vocab_size,
        "tied embeddings": getattr(cfg, "tie_word_embeddings", False),
        "parameters": f"{count_parameters(loaded.model):,}",
        "load_s": f"{loaded.load_s:.2f}",
        "loaded from": loaded.source,
    }
    for key, value in rows.items():
        table.add_row(key, str(value))
    Console().print(table)


@app.command()
def chat(
    model: Annotated[str, typer.Argument(help="Embedded name, local folder or cached Hugging Face id.")],
    prompt: Annotated[str, typer.Argument(help="The user message.")],
    max_new_tokens: Annotated[int, typer.Option(help="Most tokens to generate.")] = 128,
) -> None:
    """Answer one prompt greedily, streamed to the terminal."""
    import torch
    from transformers import TextStreamer

    from aiflow_fl.generation import chat_input_ids
    from aiflow_fl.layers import use_inference_kernels
    from aiflow_fl.models import load_backbone

    loaded = load_backbone(model)
    use_inference_kernels(loaded.model)  # the served members' kernels: `chat` and `generate` compare alike
    ids = chat_input_ids(loaded.tokenizer, prompt)
    streamer = TextStreamer(loaded.tokenizer, skip_prompt=True, skip_special_tokens=True)
    with torch.inference_mode():
        loaded.model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False, streamer=streamer)


@app.command()
def bench(
    name: Annotated[Optional[str], typer.Argument(help="Benchmark name (a module in benchmarks/).")] = None,
    quick: Annotated[bool, typer.Option("--quick", help="A version that runs in under a minute.")] = False,
    list_: Annotated[bool, typer.Option("--list", help="List the benchmarks.")] = False,
) -> None:
    """Run a benchmark: a table, plots under results/bench/NAME, and one JSON object as the last line."""
    from aiflow_fl.bench import available, run_benchmark

    if list_ or name is None:
        for bench_name in available():
            typer.echo(bench_name)
        return
    run_benchmark(name, quick)


@app.command()
def simulate(overrides: Overrides = None) -> None:
    """Federated LoRA fine-tuning under Flower's simulation engine (Ray); resume with run.resume=RUN_DIR."""
    from simulations.run import simulate_command

    simulate_command(list(overrides or []))


@app.command()
def deploy(
    overrides: Overrides = None,
    nodes: Annotated[int, typer.Option(help="SuperNodes to start (0: federation.num_devices).")] = 0,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for the run to finish.")] = 3600.0,
    insecure: Annotated[bool, typer.Option(help="Plaintext links, any node may join: local tests only.")] = False,
    ssl_ca_certfile: Annotated[Optional[Path], typer.Option(help="CA certificate (PEM) clients trust; default: generated for the run.")] = None,
    ssl_certfile: Annotated[Optional[Path], typer.Option(help="SuperLink TLS certificate (PEM), signed by the CA.")] = None,
    ssl_keyfile: Annotated[Optional[Path], typer.Option(help="SuperLink TLS private key (PEM).")] = None,
    supernode_auth: Annotated[bool, typer.Option(help="Per-node key pairs; the SuperLink admits registered keys only.")] = True,
) -> None:
    """The same apps under a real flower-superlink and N flower-supernode processes on loopback (TLS and SuperNode authentication unless --insecure), driven by `flwr run`."""
    from aiflow_fl.federated.deploy import deploy_command
    from aiflow_fl.federated.security import TlsFiles

    given = [ssl_ca_certfile, ssl_certfile, ssl_keyfile]
    if any(given) and not all(given):
        raise AiflowError("Give all three of --ssl-ca-certfile, --ssl-certfile and --ssl-keyfile, or none (generated for the run).")
    tls = TlsFiles(ssl_ca_certfile, ssl_certfile, ssl_keyfile) if all(given) else None  # type: ignore[arg-type]
    deploy_command(list(overrides or []), nodes, timeout, insecure=insecure, tls=tls, supernode_auth=supernode_auth)


@app.command()
def generate(
    prompt: Annotated[str, typer.Argument(help="The user message.")],
    tiers: Annotated[str, typer.Option(help="Chain of tiers: device[,edge][,cloud].")] = "device,edge",
    family: Annotated[Optional[str], typer.Option(help="Family folder (aiflow family build); members per tier from serving.members or smallest..largest.")] = None,
    model: Annotated[Optional[str], typer.Option(help="Without --family: backbone whose early exits are the tiers.")] = None,
    exits: Annotated[Optional[str], typer.Option(help="Without --family: exit layers of the lower tiers, e.g. 8,16 (last tier = full model).")] = None,
    remote: Annotated[Optional[list[str]], typer.Option(help="TIER=URL of a tier served by `aiflow serve` (repeatable).")] = None,
    overrides: Overrides = None,
) -> None:
    """Hierarchical speculative decoding: the device drafts, edge/cloud verify; streams the answer and prints acceptance stats."""
    from aiflow_fl.config import load_config
    from aiflow_fl.serving.commands import generate as run_generate, parse_remote

    extra = list(overrides or []) + ([f"model.name={model}"] if model else []) + ([f"serving.exits=[{exits}]"] if exits else [])
    cfg = load_config(extra)
    stats = run_generate(cfg, prompt, [t.strip() for t in tiers.split(",") if t.strip()], family, parse_remote(remote or []))
    if not stats["verified"]:
        raise typer.Exit(3)  # serving.on_verifier_loss=device and a verifier was lost: the answer is unverified


@app.command()
def serve(
    source: Annotated[Optional[str], typer.Argument(help="Family folder, or a run folder holding family/ (omit with --model).")] = None,
    tier: Annotated[Optional[str], typer.Option(help="Serve as a verifier tier (edge or cloud): one --member, for chains elsewhere.")] = None,
    member: Annotated[Optional[list[str]], typer.Option(help="Serve only these members (repeatable; default: all).")] = None,
    family: Annotated[Optional[str], typer.Option(help="Family folder (same as SOURCE).")] = None,
    model: Annotated[Optional[str], typer.Option(help="Without a family: a backbone (embedded name or folder) served as one member.")] = None,
    exit_layer: Annotated[Optional[int], typer.Option("--exit", help="With --model: serve the early exit at this layer (default: full model).")] = None,
    remote: Annotated[Optional[list[str]], typer.Option(help="MEMBER=URL: a chain member served by another `aiflow serve` (repeatable).")] = None,
    remote_ca: Annotated[Optional[str], typer.Option(help="CA certificate file to trust for https remote tiers.")] = None,
    host: Annotated[str, typer.Option(help="Address to bind (0.0.0.0: every interface; use TLS and a key then).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port (0: any free one, printed as READY PORT URL).")] = 0,
    api_key: Annotated[Optional[str], typer.Option(envvar="AIFLOW_API_KEY", help="Require 'Authorization: Bearer KEY' on /v1/* and /tier/*.")] = None,
    ssl_keyfile: Annotated[Optional[str], typer.Option(help="TLS private key (PEM).")] = None,
    ssl_certfile: Annotated[Optional[str], typer.Option(help="TLS certificate (PEM).")] = None,
    core: Annotated[Optional[int], typer.Option(help="Pin this process to one CPU core.")] = None,
    threads: Annotated[Optional[int], typer.Option(help="torch threads.")] = None,
    overrides: Overrides = None,
) -> None:
    """OpenAI-compatible API (/v1/models, /v1/chat/completions, /v1/completions, /health, /metrics) for a family's
    members and chains, the collaboration model `collab` of a run with specialists, and the tier protocol its
    verifiers speak (`--tier edge|cloud`)."""
    from aiflow_fl.config import load_config
    from aiflow_fl.errors import AiflowError
    from aiflow_fl.serving.api.main import serve as run_server
    from aiflow_fl.serving.commands import parse_member_remote

    extra = list(overrides or [])
    if source and "=" in source and not os.path.exists(source):  # only overrides were given
        extra, source = [source, *extra], None
    folder = source or family
    if tier is not None and tier not in ("edge", "cloud"):
        raise AiflowError(f"--tier is '{tier}'; a verifier server is an 'edge' or a 'cloud' tier.")
    if tier is not None and folder and len(member or []) != 1:
        raise AiflowError("--tier with a family needs exactly one --member NAME (the member this tier verifies with).")
    cfg = load_config(extra + ([f"model.name={model}"] if model else []))
    if not folder and not model and tier is None and not cfg.collab.run:
        raise AiflowError("Give a family folder (or a run folder holding one or specialists/), --model for a single "
                          "backbone, or collab.run=RUN_DIR for the collaboration model alone.")
    run_server(cfg, folder, list(member or []), parse_member_remote(remote or []), model, exit_layer, host, port, api_key,
               ssl_keyfile, ssl_certfile, remote_ca, tier, core, threads)


@app.command()
def collaborate(
    query: Annotated[str, typer.Argument(help="The question the specialists answer together.")],
    overrides: Overrides = None,
) -> None:
    """Device-server collaboration on a run's specialists (collab.run=RUN_DIR): route, fan out, synthesize, revise."""
    from aiflow_fl.collab.cli import collaborate_command

    collaborate_command(query, list(overrides or []))


@app.command()
def demo(
    overrides: Overrides = None,
    rebuild_family: Annotated[bool, typer.Option("--rebuild-family", help="Build the family again even when one of this exact config is cached.")] = False,
) -> None:
    """The main job on the embedded default: build a family, fine-tune it federatedly, serve it (~10 min)."""
    from aiflow_fl.demo import run_demo

    run_demo(list(overrides or []), rebuild_family=rebuild_family)


@app.command("config")
def show_config(overrides: Overrides = None) -> None:
    """Print the effective configuration (defaults <- conf/config.yaml <- overrides)."""
    from aiflow_fl.config import load_config, to_yaml

    typer.echo(to_yaml(load_config(overrides)))


def main() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        app()
    except AiflowError as exc:
        typer.secho(f"aiflow: error: {exc}", fg=typer.colors.RED, err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
