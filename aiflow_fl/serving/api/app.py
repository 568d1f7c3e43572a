"""The FastAPI application: thin handlers over :mod:`state`, :mod:`scheduler` and :mod:`chains`.

OpenAI-compatible ``/v1/models``, ``/v1/chat/completions``, ``/v1/completions`` (SSE streaming with
``data:`` chunks and ``data: [DONE]``), ``/health`` (503 while loading), ``/metrics`` (Prometheus),
the collaboration protocol as the chat model ``collab`` (:mod:`collab`),
and the tier protocol (``/tier/*``, :mod:`aiflow_fl.serving.server`). ``/v1/*`` and ``/tier/*`` need
``Authorization: Bearer KEY`` when the server has a key; ``/health`` and ``/metrics`` stay open.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
import uuid

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from sse_starlette.sse import EventSourceResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from aiflow_fl.serving.api.collab import check_collab_request
from aiflow_fl.serving.api.errors import APIError, error_body, error_response, validation_message
from aiflow_fl.serving.api.limits import completion_budget
from aiflow_fl.serving.api.scheduler import Event, Sequence
from aiflow_fl.serving.api.schemas import ChatRequest, CompletionRequest
from aiflow_fl.serving.api.state import ServerState
from aiflow_fl.serving.api.text import TextStream


class BodyLimit:
    """ASGI middleware: a request body above the limit (declared or streamed) gets a 413.

    The body is read here, up to the limit, before the app sees it: an app that reads a streamed
    (chunked) body itself would turn an exception raised mid-read into its own "cannot parse" 400.
    """

    def __init__(self, app, limit: int, tier_limit: int) -> None:
        self.app, self.limit, self.tier_limit = app, limit, tier_limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit = self.tier_limit if scope["path"].startswith("/tier/") else self.limit
        declared = dict(scope.get("headers") or []).get(b"content-length")
        too_big = JSONResponse(error_body(413, f"The request body is larger than this server's limit of {limit} bytes "
                                               "(serving.api.max_body_bytes).", None, "body_too_large"), status_code=413)
        if declared is not None and declared.isdigit() and int(declared) > limit:
            return await too_big(scope, receive, send)
        chunks, seen = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client left before its body was complete
                return
            chunks.append(message.get("body", b""))
            seen += len(chunks[-1])
            if seen > limit:
                return await too_big(scope, receive, send)
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()  # later reads: disconnect detection of a streamed answer

        await self.app(scope, replay, send)


def create_app(state: ServerState) -> FastAPI:
    app = FastAPI(title="aiflow-fl", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(BodyLimit, limit=state.api.max_body_bytes, tier_limit=state.api.max_tier_body_bytes)
    metrics = state.metrics

    @app.middleware("http")
    async def authorize(request: Request, call_next):
        path = request.url.path
        if state.api_key and (path.startswith("/v1/") or path.startswith("/tier/")):
            given = request.headers.get("authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {state.api_key}".encode()):
                metrics.errors.labels("401").inc()
                return error_response(401, "Missing or wrong API key: send 'Authorization: Bearer KEY'.", None, "invalid_api_key")
        if (path.startswith("/v1/") or path.startswith("/tier/")) and not state.ready:
            why = f"loading failed: {state.failure}" if state.failure else "the models are still loading"
            return error_response(503, f"Not ready: {why}.", None, "not_ready")
        response = await call_next(request)
        if response.status_code >= 400:
            metrics.errors.labels(str(response.status_code)).inc()
        return response

    @app.exception_handler(APIError)
    async def api_error(_: Request, exc: APIError):
        return error_response(exc.status, exc.message, exc.param, exc.code)

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, exc: RequestValidationError):
        message, field = validation_message(list(exc.errors()))
        return error_response(400, message, field, "invalid_request")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException):
        return error_response(exc.status_code, str(exc.detail), None, None)

    @app.exception_handler(Exception)
    async def crash(_: Request, exc: Exception):  # a bug: a 500 without internals, the server goes on
        return error_response(500, f"Internal error ({type(exc).__name__}).", None, "internal_error")

    # ------------------------------------------------------------------ open endpoints
    @app.get("/health")
    async def health():
        if state.ready:
            return {"status": "ok", "models": list(state.models)}
        status = "failed" if state.failure else "loading"
        return JSONResponse({"status": status, "detail": state.failure}, status_code=503)

    @app.get("/metrics")
    async def prometheus():
        return Response(metrics.render(), media_type="text/plain; version=0.0.4")

    # ------------------------------------------------------------------ OpenAI API
    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [
            {"id": s.name, "object": "model", "created": s.created, "owned_by": "aiflow-fl", "root": s.name,
             "max_model_len": s.context, "aiflow": {"kind": s.kind}} for s in state.models.values()]}

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest, request: Request):
        served = state.model(body.model)
        if served.kind == "collab":
            return await _collaborate(served, body)
        ids = state.chat_ids([{"role": m.role if m.role != "developer" else "system", "content": m.text()} for m in body.messages])
        return await _generate(request, served, body, ids, "messages", chat=True)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        served = state.model(body.model)
        if served.kind == "collab":
            raise APIError(400, f"The model '{served.name}' answers chat messages; use /v1/chat/completions.", "model")
        return await _generate(request, served, body, state.prompt_ids(body.prompt), "prompt", chat=False)

    async def _collaborate(served, body: ChatRequest):
        """One run of the collaboration protocol (:mod:`aiflow_fl.serving.api.collab`): the synthesis as the
        message, routing, agents, dropped ones and timings in ``aiflow.collab``."""
        check_collab_request(body)
        limit = body.limit()
        if limit is not None and limit > state.api.max_tokens_cap:
            raise APIError(400, f"max_tokens is {limit}, above this server's cap of {state.api.max_tokens_cap} "
                                "(serving.api.max_tokens_cap).", "max_tokens")
        messages = [{"role": m.role if m.role != "developer" else "system", "content": m.text()} for m in body.messages]
        rid, created, start = f"chatcmpl-{uuid.uuid4().hex}", int(time.time()), time.perf_counter()
        metrics.running.labels(served.name).inc()
        try:
            text, prompt_tokens, completion_tokens, summary = await run_in_threadpool(served.engine.answer, messages, limit)
        finally:
            metrics.running.labels(served.name).dec()
            metrics.latency.labels(served.name).observe(time.perf_counter() - start)
        finish = "length" if limit is not None and completion_tokens >= limit else "stop"
        metrics.requests.labels(served.name, finish).inc()
        metrics.prompt_tokens.labels(served.name).inc(prompt_tokens)
        metrics.generation_tokens.labels(served.name).inc(completion_tokens)
        usage = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                 "total_tokens": prompt_tokens + completion_tokens}
        extra = {"aiflow": {"collab": summary}}
        if not body.stream:
            return JSONResponse({"id": rid, "object": "chat.completion", "created": created, "model": served.name,
                                 "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                              "logprobs": None, "finish_reason": finish}], "usage": usage, **extra})

        def chunk(choices: list[dict], **more) -> dict:
            return {"data": json.dumps({"id": rid, "object": "chat.completion.chunk", "created": created,
                                        "model": served.name, "choices": choices, **more})}

        async def sse():  # the protocol has finished: role, the whole synthesis, then the finish reason
            yield chunk([{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}])
            yield chunk([{"index": 0, "delta": {"content": text}, "logprobs": None, "finish_reason": None}])
            yield chunk([{"index": 0, "delta": {}, "logprobs": None, "finish_reason": finish}], **extra)
            if body.stream_options and body.stream_options.include_usage:
                yield chunk([], usage=usage)
            yield {"data": "[DONE]"}

        return EventSourceResponse(sse(), sep="\n", ping=600)

    async def _generate(request: Request, served, body, ids: list[int], prompt_field: str, chat: bool):
        if served.kind == "chain" and body.top_p < 1.0:
            raise APIError(400, "Chain models sample from the verifier's full distribution (speculative sampling); "
                                "top_p must be 1 for them.", "top_p")
        budget = completion_budget(len(ids), body.limit(), served.context, state.api.max_tokens_cap,
                                   state.api.default_max_tokens, prompt_field)
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Event] = asyncio.Queue()
        seq = Sequence(ids, budget, lambda ev: loop.call_soon_threadsafe(queue.put_nowait, ev),
                       TextStream(lambda t: state.tokenizer.decode(t, skip_special_tokens=True), body.stop),
                       eos=state.eos(served), temperature=body.temperature, top_p=body.top_p, seed=body.seed)
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        created, start = int(time.time()), time.perf_counter()
        metrics.running.labels(served.name).inc()
        metrics.prompt_tokens.labels(served.name).inc(len(ids))
        served.engine.submit(seq)
        first: list[float] = []

        async def events():
            try:
                while True:
                    event = await queue.get()
                    if not first and event.token_ids:
                        first.append(time.perf_counter() - start)
                        metrics.ttft.labels(served.name).observe(first[0])
                    yield event
                    if event.final:
                        return
            finally:
                if not seq.done or seq.finish_reason is None:
                    served.engine.cancel(seq)  # the client left: free its slot at the next step
                metrics.running.labels(served.name).dec()
                metrics.latency.labels(served.name).observe(time.perf_counter() - start)
                metrics.generation_tokens.labels(served.name).inc(len(seq.generated))
                if seq.finish_reason in ("stop", "length"):
                    metrics.requests.labels(served.name, seq.finish_reason).inc()

        def usage() -> dict:
            return {"prompt_tokens": len(ids), "completion_tokens": len(seq.generated),
                    "total_tokens": len(ids) + len(seq.generated)}

        def choice(text: str, finish: str | None, delta: bool) -> dict:
            if not chat:
                return {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
            if delta:
                return {"index": 0, "delta": {"content": text} if text else {}, "logprobs": None, "finish_reason": finish}
            return {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None, "finish_reason": finish}

        kind = "chat.completion" if chat else "text_completion"
        if not body.stream:
            text, token_ids, extra, finish = [], [], None, None
            gen = events()
            waiter = asyncio.ensure_future(gen.__anext__())
            try:
                while True:
                    done, _ = await asyncio.wait({waiter}, timeout=0.5)
                    if not done:
                        if await request.is_disconnected():
                            waiter.cancel()
                            served.engine.cancel(seq)
                            return Response(status_code=499)
                        continue
                    try:
                        event = waiter.result()
                    except StopAsyncIteration:
                        break
                    if event.error:
                        raise APIError(event.error[0], event.error[1], None, "generation_failed")
                    text.append(event.text)
                    token_ids += event.token_ids
                    extra, finish = event.extra or extra, event.finish_reason or finish
                    if event.final:
                        break
                    waiter = asyncio.ensure_future(gen.__anext__())
            finally:
                await gen.aclose()
            payload = {"id": rid, "object": kind, "created": created, "model": served.name,
                       "choices": [choice("".join(text), finish, delta=False)], "usage": usage(),
                       "aiflow": {"token_ids": token_ids, **(extra or {})}}
            return JSONResponse(payload)

        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        chunk_kind = "chat.completion.chunk" if chat else "text_completion"

        def chunk(choices: list[dict], **more) -> dict:
            return {"data": json.dumps({"id": rid, "object": chunk_kind, "created": created, "model": served.name,
                                        "choices": choices, **more})}

        async def sse():
            if chat:  # the first delta carries the role
                yield chunk([{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}])
            pending: list[int] = []  # ids whose text is still held back (a stop string may start there)
            async for event in events():
                if event.error:
                    yield {"data": json.dumps(error_body(event.error[0], event.error[1], None, "generation_failed"))}
                    break
                pending += event.token_ids
                if event.text or event.finish_reason:
                    more = {"aiflow": {"token_ids": pending, **(event.extra or {})}}
                    pending = []
                    yield chunk([choice(event.text, event.finish_reason, delta=True)], **more)
                if event.final and include_usage:
                    yield chunk([], usage=usage())
            yield {"data": "[DONE]"}

        return EventSourceResponse(sse(), sep="\n", ping=600)

    # ------------------------------------------------------------------ tier protocol
    @app.get("/tier/info")
    async def tier_info():
        return state.tier_sessions.info()

    @app.post("/tier/process")
    async def tier_process(request: Request):
        from aiflow_fl.serving.server import TierRequestError

        body = await request.body()
        try:
            reply = await run_in_threadpool(state.tier_sessions.process, body)
        except TierRequestError as exc:
            return error_response(exc.status, exc.message, exc.param, exc.code)
        return Response(reply, media_type="application/octet-stream")

    @app.delete("/tier/sessions/{session}")
    async def tier_close(session: str):
        return {"closed": state.tier_sessions.close(session)}

    return app
