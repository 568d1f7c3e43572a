"""Assembling a collaboration from a run's saved specialists, with every check done before a model loads.

:func:`open_collaboration` validates (settings, query, the embedding model, the run's specialist
folders and their descriptions) and only then loads the router's encoder, the general member and the
specialists — in this process (threads) or each in its own worker process (``collab.processes``).
:func:`collaborate` is one round trip for scripts (a :class:`CollabResult`), and
:func:`collaboration_round` the same as plain data for the demo::

    from aiflow_fl.collab.session import collaboration_round
    out = collaboration_round("runs/hier", "How do I open a file?", ["collab.top_k=2"])
    print(out["routing"]["scores"], out["answers"], out["answer"], out["timings_s"], out["bytes"])
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from aiflow_fl.collab.protocol import CollabResult, CollabSettings, Collaboration, check_query, check_settings
from aiflow_fl.collab.router import Route, Router, check_router_settings
from aiflow_fl.collab.specialists import SpecialistInfo, read_run_specialists
from aiflow_fl.errors import AiflowError


def settings_of(cfg) -> CollabSettings:
    c = cfg.collab
    return CollabSettings(top_k=c.top_k, threshold=c.threshold, rounds=c.rounds, timeout_s=c.timeout_s,
                          max_new_tokens=c.max_new_tokens, max_query_chars=c.max_query_chars, synthesis=c.synthesis)


@dataclass
class Prepared:
    """What was checked before loading: the run, its members and the settings."""

    run_dir: Path
    general: SpecialistInfo
    specialists: list[SpecialistInfo]
    settings: CollabSettings


def prepare(cfg, run_dir: str | Path | None, query: str | None = None) -> Prepared:
    """Every check that needs no model: settings, query, embedding model installed, specialists readable."""
    from aiflow_fl.collab.embed import embedding_model_dir

    settings = settings_of(cfg)
    check_settings(settings)
    check_router_settings(cfg.collab.top_k, cfg.collab.threshold, cfg.collab.temperature, cfg.collab.top_m,
                          cfg.collab.lexical_weight)
    if query is not None:
        check_query(query, settings.max_query_chars)
    run = run_dir or cfg.collab.run
    if not run:
        raise AiflowError("No run given: name the run folder whose specialists answer with collab.run=RUN_DIR "
                          "(a hierarchical run with collab.save_specialists=true).")
    embedding_model_dir()
    general, specialists = read_run_specialists(run)
    return Prepared(Path(run), general, specialists, settings)


def open_collaboration(cfg, run_dir: str | Path | None = None, query: str | None = None, overrides: list[str] | None = None) -> Collaboration:
    """A ready :class:`Collaboration` over a run's specialists (call ``close()`` when done)."""
    from aiflow_fl.collab.agents import LocalAgent, ProcessAgent
    from aiflow_fl.collab.embed import shared_encoder
    from aiflow_fl.collab.specialists import load_specialist_model, local_agent_from_folder
    from aiflow_fl.config import load_config

    prepared = prepare(cfg, run_dir, query)
    run_cfg = load_config(list(overrides or []), config_file=prepared.run_dir / "config.yaml")
    routes = [Route(s.name, s.description, list(s.utterances)) for s in prepared.specialists]
    router = Router(routes, shared_encoder(), cfg.collab.top_k, cfg.collab.threshold, cfg.collab.temperature, cfg.collab.top_m,
                    cfg.collab.lexical_weight)
    model, tokenizer = load_specialist_model(run_cfg, prepared.general)
    general = LocalAgent(prepared.general.name, model, tokenizer)
    agents: dict = {}
    try:
        for info in prepared.specialists:
            if cfg.collab.processes:
                agents[info.name] = ProcessAgent(info.name, local_agent_from_folder, (str(prepared.run_dir), info.folder, list(overrides or [])))
            else:
                m, t = load_specialist_model(run_cfg, info)
                agents[info.name] = LocalAgent(info.name, m, t)
    except Exception:
        for agent in agents.values():
            if isinstance(agent, ProcessAgent):
                agent.close()
        raise
    collab = Collaboration(router, agents, general, prepared.settings, tokenizer)
    collab.processes = [a for a in agents.values() if isinstance(a, ProcessAgent)]  # type: ignore[attr-defined]
    return collab


def close_collaboration(collab: Collaboration) -> None:
    for agent in getattr(collab, "processes", []):
        agent.close()
    collab.close()


def collaboration_round(run_dir: str | Path, query: str, overrides: list[str] | None = None) -> dict:
    """One collaboration round between a run's federated specialists, as plain data (for the demo).

    Checks everything before any model loads (:func:`prepare`), loads the general member and the
    specialists saved by a hierarchical run (``RUN_DIR/specialists/``), runs route → parallel answers →
    synthesis → broadcast and revision once and returns::

        {"query", "answer" (the synthesis), "note" (who answered and why; drops),
         "routing": {"scores": {specialist: cosine}, "selected": [...], "weights": {...}, "threshold"},
         "answers": {specialist: first answer}, "agents": {specialist: {seconds, new_tokens, bytes_up, bytes_down}},
         "revisions": {specialist: last revised answer},
         "dropped": {specialist: why}, "timings_s": {step: wall s, "fan-out sum of agents": s, "total": s},
         "bytes": {"server->device": n, "device->server": n}, "warnings": [...]}

    ``overrides`` are config overrides (``collab.top_k=3``, ``collab.rounds=0``, ``collab.synthesis=fusion``,
    ``collab.max_new_tokens=32``, ...).
    """
    return result_summary(collaborate(run_dir, query, overrides))


def result_summary(result: CollabResult) -> dict:
    """A :class:`CollabResult` as plain JSON-able data (the demo's round and the API's ``aiflow.collab`` field)."""
    fan = result.step("fan-out")
    revisions = [s for s in result.steps if s.name.startswith("revision")]
    timings = {s.name: round(s.wall_s, 3) for s in result.steps}
    if fan is not None:
        timings["fan-out sum of agents"] = round(fan.sum_agent_s, 3)
    timings["total"] = round(result.wall_s, 3)
    last: dict[str, str] = {}
    for step in revisions:
        last.update({n: r.text for n, r in step.replies.items()})
    return {
        "query": result.query, "answer": result.answer, "note": result.note,
        "routing": {"scores": result.routing.scores, "selected": result.routing.selected,
                    "weights": result.routing.weights, "threshold": result.routing.threshold},
        "answers": {n: r.text for n, r in fan.replies.items()} if fan else {},
        "agents": {n: {"seconds": round(r.seconds, 3), "new_tokens": r.new_tokens, "bytes_up": r.bytes_up,
                       "bytes_down": r.bytes_down} for n, r in fan.replies.items()} if fan else {},
        "revisions": last,
        "dropped": {n: why for s in result.steps for n, why in s.dropped.items()},
        "timings_s": timings, "bytes": dict(result.bytes), "warnings": list(result.warnings),
    }


def collaborate(run_dir: str | Path, query: str, overrides: list[str] | None = None) -> CollabResult:
    """One collaboration on a run's specialists: route, fan out, synthesize, broadcast and revise."""
    from aiflow_fl.config import load_config

    cfg = load_config(list(overrides or []))
    collab = open_collaboration(cfg, run_dir, query, overrides=[o for o in overrides or [] if not o.startswith("collab.")])
    try:
        return collab.run(query)
    finally:
        close_collaboration(collab)
