"""The device-server collaboration protocol (:mod:`aiflow_fl.collab`) served as the model ``collab``.

``aiflow serve RUN_DIR`` on a run folder with ``specialists/`` (a hierarchical run with
``collab.save_specialists=true``), or any ``aiflow serve ... collab.run=RUN_DIR``, lists ``collab`` in
``/v1/models``. A chat completion on it runs the protocol once on the last user message — route,
parallel fan-out, synthesis, broadcast and revision — and answers with the synthesis; the extra
response field ``aiflow.collab`` carries the routing scores, each agent's answer, time and bytes,
the dropped specialists and the step timings (:func:`aiflow_fl.collab.session.result_summary`).

The protocol decodes greedily: a request that sets ``temperature`` > 0, ``top_p`` < 1 or stop
strings is refused (400) rather than silently answered otherwise. Streaming sends the synthesis as one
content chunk once the protocol has finished (its steps cannot be streamed token by token).
Every check of the run (specialists, descriptions, the embedding model) happens before the port
opens (:func:`check_collab_run`), the loading after it (:func:`open_collab`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiflow_fl.errors import AiflowError
from aiflow_fl.serving.api.errors import APIError

COLLAB_MODEL = "collab"


def collab_run_for(cfg, source: str | None) -> Path | None:
    """The run whose specialists ``collab`` serves: ``collab.run`` when given, else SOURCE when it has ``specialists/``."""
    from aiflow_fl.collab.specialists import SPECIALISTS_DIR

    if cfg.collab.run:
        return Path(cfg.collab.run)
    if source and (Path(source) / SPECIALISTS_DIR).is_dir():
        return Path(source)
    return None


def check_collab_run(cfg, run: Path) -> None:
    """Every check that needs no model (settings, the embedding model, the run's specialists and their
    descriptions): an :class:`AiflowError` naming what is missing, before the server opens its port."""
    from aiflow_fl.collab.session import prepare

    prepare(cfg, run)


@dataclass
class CollabModel:
    """A loaded :class:`~aiflow_fl.collab.protocol.Collaboration` and what the API needs around it."""

    collab: Any  # aiflow_fl.collab.protocol.Collaboration
    tokenizer: Any
    context: int

    def answer(self, messages: list[dict[str, str]], max_new_tokens: int | None) -> tuple[str, int, int, dict]:
        """(synthesis, prompt tokens, completion tokens, summary) of one collaboration on the last user message."""
        from aiflow_fl.collab.agents import chat_prompt_ids
        from aiflow_fl.collab.protocol import check_query
        from aiflow_fl.collab.session import result_summary

        query = query_of(messages)
        try:
            check_query(query, self.collab.settings.max_query_chars)
        except AiflowError as exc:
            raise APIError(400, str(exc), "messages", "invalid_query") from None
        result = self.collab.run(query, max_new_tokens=max_new_tokens)
        final = next(s for s in reversed(result.steps) if s.name.startswith(("synthesis", "general")))
        completion_tokens = sum(r.new_tokens for r in final.replies.values())
        prompt_tokens = len(chat_prompt_ids(self.tokenizer, [{"role": "user", "content": result.query}]))
        return result.answer, prompt_tokens, completion_tokens, result_summary(result)

    def close(self) -> None:
        from aiflow_fl.collab.session import close_collaboration

        close_collaboration(self.collab)


def open_collab(cfg, run: Path) -> CollabModel:
    """Load the router's encoder, the run's general member and its specialists (after :func:`check_collab_run`)."""
    from aiflow_fl.collab.session import open_collaboration

    collab = open_collaboration(cfg, run)
    model = getattr(collab.general, "model", None)
    context = cfg.serving.api.max_model_len or int(getattr(getattr(model, "config", None), "max_position_embeddings", 2048))
    return CollabModel(collab, collab.general.tokenizer, context)


def query_of(messages: list[dict[str, str]]) -> str:
    """The question the specialists answer: the last user message (the protocol takes one query)."""
    users = [m["content"] for m in messages if m["role"] == "user"]
    if not users:
        raise APIError(400, f"The model '{COLLAB_MODEL}' answers the last user message; these messages have none.",
                       "messages", "invalid_query")
    return users[-1]


def check_collab_request(body) -> None:
    """Refuse what the greedy protocol cannot honour (a 400 naming the field), instead of ignoring it."""
    if "temperature" in body.model_fields_set and body.temperature != 0:
        raise APIError(400, f"The model '{COLLAB_MODEL}' decodes greedily; temperature must be 0 or left out.", "temperature")
    if body.top_p < 1.0:
        raise APIError(400, f"The model '{COLLAB_MODEL}' decodes greedily; top_p must be 1.", "top_p")
    if body.stop:
        raise APIError(400, f"The model '{COLLAB_MODEL}' does not support stop strings.", "stop")
