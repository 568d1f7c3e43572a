"""The ``aiflow`` command line.

Heavy imports (torch, transformers, flwr) happen inside commands so ``aiflow --help`` stays fast.
An :class:`AiflowError` is printed as one paragraph with exit code 2; other exceptions are bugs and
keep their traceback.
"""

from __future__ import annotations

import os
import sys
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
    from aiflow_fl.models import load_backbone

    loaded = load_backbone(model)
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
