"""``aiflow collaborate "question" [overrides]``: one collaboration, shown as 80-column rich tables.

Printed: the routing scores (every specialist, the threshold, the selected ones and their fusion
weights), each agent's answer with its own time, tokens and bytes on its link, the synthesis, the
revisions, then the step timings and the bytes per link. Every check (settings, query, embedding
model, the run's specialists and their descriptions) happens before any model loads.
"""

from __future__ import annotations

import sys

from aiflow_fl.collab.protocol import CollabResult


def _console():
    from rich.console import Console

    return Console(width=80) if not sys.stdout.isatty() else Console(width=min(80, Console().width))


def show_result(result: CollabResult, console=None) -> None:
    from rich.panel import Panel
    from rich.table import Table

    console = console or _console()
    routing = Table(title="routing (all-MiniLM-L6-v2 cosine, mean of top-m utterances)", width=80)
    routing.add_column("specialist")
    routing.add_column("score", justify="right")
    routing.add_column("selected")
    routing.add_column("weight", justify="right")
    for name, score in sorted(result.routing.scores.items(), key=lambda kv: -kv[1]):
        chosen = name in result.routing.selected
        routing.add_row(name, f"{score:.3f}", "yes" if chosen else "", f"{result.routing.weights[name]:.2f}" if chosen else "")
    routing.caption = f"threshold {result.routing.threshold:.2f}, top-k {result.routing.top_k}: {result.note}"
    console.print(routing)
    for step in result.steps:
        if step.name == "route":
            continue
        table = Table(title=f"{step.name} ({step.wall_s:.2f} s wall)", width=80, show_lines=True)
        table.add_column("agent", max_width=14)
        table.add_column("s", justify="right")
        table.add_column("tok", justify="right")
        table.add_column("B up/down", justify="right")
        table.add_column("answer", ratio=1)
        for name, reply in step.replies.items():
            table.add_row(name, f"{reply.seconds:.2f}", str(reply.new_tokens), f"{reply.bytes_up}/{reply.bytes_down}", reply.text)
        for name, why in step.dropped.items():
            table.add_row(name, "-", "-", "-", f"[red]dropped: {why}[/red]")
        console.print(table)
    console.print(Panel(result.answer or "(empty)", title="answer", width=80))
    summary = Table(title="timings and bytes per link", width=80)
    summary.add_column("figure")
    summary.add_column("value", justify="right")
    for step in result.steps:
        summary.add_row(f"{step.name} wall s", f"{step.wall_s:.2f}")
        if len(step.replies) > 1:
            summary.add_row(f"{step.name} sum of agents' s", f"{step.sum_agent_s:.2f}")
    for link, value in result.bytes.items():
        summary.add_row(f"bytes {link}", f"{value:,}")
    summary.add_row("total wall s", f"{result.wall_s:.2f}")
    console.print(summary)
    for warning in result.warnings:
        console.print(f"[yellow]warning:[/yellow] {warning}")


def collaborate_command(query: str, overrides: list[str]) -> CollabResult:
    """Check everything, load the run's members, run the protocol once, print it."""
    from aiflow_fl.collab.session import close_collaboration, open_collaboration, prepare
    from aiflow_fl.config import load_config

    cfg = load_config(overrides)
    console = _console()
    prepared = prepare(cfg, None, query)  # every check before any model loads
    console.print(f"[bold]collaborate[/bold]: {len(prepared.specialists)} specialist(s) of {prepared.run_dir}; loading members")
    collab = open_collaboration(cfg, prepared.run_dir, query, overrides=[o for o in overrides if not o.startswith("collab.")])
    try:
        console.print("running: route, fan out, synthesize, broadcast and revise")
        result = collab.run(query)
    finally:
        close_collaboration(collab)
    show_result(result, console)
    return result
