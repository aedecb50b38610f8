"""The OpenAI-compatible HTTP server: routing, streaming and shutdown around a running ``Engine``.

Endpoints: ``POST /v1/completions``, ``POST /v1/chat/completions`` (``stream: true`` answers in
server-sent events ending with ``data: [DONE]``), ``GET /v1/models``, ``GET /health`` and
``GET /metrics`` (Prometheus text). Schemas and response bodies live in ``openai_api``; chat templates
in ``chat``. Every error is OpenAI's nested ``{"error": {"message", "type", "param", "code"}}``: 400 for
a bad request (``param`` names the field), 404 for another model name, 429 when the engine's queue is
full, 503 while shutting down.

A request whose client goes away is aborted, so its slot frees at the engine's next step: a stream
when its generator is cancelled or closed, a plain request when the connection reports a disconnect
while it waits.

``run_server`` serves until SIGTERM or SIGINT, then stops taking requests (503), lets the running
ones finish for at most ``drain_timeout`` seconds, aborts the rest, shuts the engine down and returns,
so the process exits 0. A second signal aborts the running requests at once (their streams still end
with ``finish_reason: "abort"`` and ``[DONE]``); a third closes the connections as they are.
"""

from __future__ import annotations

import asyncio
import errno
import json
import signal
import socket
import sys
import threading
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from hybridlm.engine import openai_api as api
from hybridlm.engine.chat import ChatTemplate
from hybridlm.engine.requests import EngineStopped, QueueFull, RequestError

DEFAULT_DRAIN_TIMEOUT = 30.0
# once the engine has stopped, how long uvicorn waits for responses still being written
GRACEFUL_CLOSE_SECONDS = 5


class ModelNotFound(LookupError):
    pass


def build_app(engine: Any, model_name: str, tokenizer: Any, chat_template: ChatTemplate) -> FastAPI:
    """The FastAPI app serving ``engine`` (already started, or started before the first request)."""
    app = FastAPI(title="hybridlm", version="1", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engine = engine
    app.state.is_draining = False
    created = api.now()
    max_model_len = engine.max_model_len
    _add_error_handlers(app)

    def check_request(model: str) -> None:
        if app.state.is_draining:
            raise EngineStopped("the server is shutting down and takes no new request")
        if model != model_name:
            raise ModelNotFound(f"the model {model!r} does not exist; this server serves {model_name!r}")

    @app.post("/v1/completions")
    async def completions(body: api.CompletionRequest, request: Request) -> Response:
        check_request(body.model)
        prompt_ids, params = api.completion_inputs(body, tokenizer)
        handles = _submit_all(engine, prompt_ids, params)
        stream = _Responder("completion", model_name, tokenizer, handles, body.logprobs is not None)
        if body.stream:
            return stream.sse(include_usage=bool(body.stream_options and body.stream_options.include_usage))
        return await stream.json(request)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: api.ChatCompletionRequest, request: Request) -> Response:
        check_request(body.model)
        try:
            prompt_ids, params = api.chat_inputs(body, tokenizer, chat_template, max_model_len)
            handles = _submit_all(engine, prompt_ids, params)
        except RequestError as error:  # the engine names its own inputs; name the chat fields instead
            raise RequestError(str(error), api.chat_param(body, error.param)) from None
        stream = _Responder("chat", model_name, tokenizer, handles, body.logprobs)
        if body.stream:
            return stream.sse(include_usage=bool(body.stream_options and body.stream_options.include_usage))
        return await stream.json(request)

    @app.get("/v1/models")
    async def models() -> dict:
        return api.model_list(model_name, created, max_model_len)

    @app.get("/health")
    async def health() -> JSONResponse:
        stats = engine.stats()
        if stats.get("error"):  # the engine thread failed: every request would get 503
            return JSONResponse({**stats, "status": "error"}, status_code=503)
        if app.state.is_draining:
            return JSONResponse({**stats, "status": "shutting_down"}, status_code=503)
        return JSONResponse({**stats, "status": "ok"})

    @app.get("/metrics")
    async def metrics() -> Response:
        if engine.metrics is None:
            return _error(404, "this engine runs without metrics", code="metrics_disabled")
        body, content_type = engine.metrics.render()
        return Response(body, media_type=content_type)

    return app


def _submit_all(engine: Any, prompt_ids: list[int], params: list[Any]) -> list[Any]:
    """One engine request per choice; if one is refused, the ones already submitted are aborted."""
    handles = []
    try:
        for choice_params in params:
            handles.append(engine.submit(prompt_ids, choice_params))
    except BaseException:
        for handle in handles:
            handle.abort()
        raise
    return handles


class _Responder:
    """Turns the engine's events of one HTTP request's choices into a JSON body or an SSE stream."""

    def __init__(self, kind: api.Kind, model_name: str, tokenizer: Any, handles: list[Any], wants_logprobs: bool):
        self.kind, self.model_name, self.handles, self.wants_logprobs = kind, model_name, handles, wants_logprobs
        self.choices = [api.Choice(index, tokenizer) for index in range(len(handles))]
        self.response_id = api.new_id("cmpl" if kind == "completion" else "chatcmpl")
        self.created = api.now()

    async def json(self, request: Request) -> Response:
        """Waits for every choice; a client that disconnects meanwhile has its requests aborted."""
        watcher = asyncio.create_task(self._abort_on_disconnect(request))
        try:
            async for index, event in _merge(self.handles):
                self.choices[index].add(event)
        finally:
            watcher.cancel()
            self._abort_unfinished()
        build = api.completion_response if self.kind == "completion" else api.chat_response
        return JSONResponse(build(self.response_id, self.model_name, self.created, self.choices, self.wants_logprobs))

    def sse(self, include_usage: bool) -> StreamingResponse:
        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        return _StreamThenAbort(
            self._events(include_usage), self._abort_unfinished, media_type="text/event-stream", headers=headers
        )

    async def _events(self, include_usage: bool) -> AsyncIterator[str]:
        # the finally runs when the client disconnects too (Starlette cancels or closes this generator)
        envelope = (self.response_id, self.model_name, self.created)
        try:
            if self.kind == "chat":
                for choice in self.choices:
                    yield _sse(api.role_chunk(*envelope, choice.index))
            async for index, event in _merge(self.handles):
                delta = self.choices[index].add(event)
                yield _sse(api.chunk(self.kind, *envelope, index, delta, self.wants_logprobs))
            if include_usage:
                yield _sse(api.usage_chunk(self.kind, *envelope, self.choices))
            yield "data: [DONE]\n\n"
        finally:
            self._abort_unfinished()

    async def _abort_on_disconnect(self, request: Request) -> None:
        # the body has been read, so the next ASGI message is the disconnect (event-driven, no polling)
        while (await request.receive())["type"] != "http.disconnect":
            pass
        self._abort_unfinished()

    def _abort_unfinished(self) -> None:
        for handle, choice in zip(self.handles, self.choices, strict=True):
            if choice.finish_reason is None:
                handle.abort()


class _StreamThenAbort(StreamingResponse):
    """A StreamingResponse that aborts its requests however it ends: a client gone before the first
    chunk cancels the response before the generator starts, so the generator's own finally never runs."""

    def __init__(self, content: AsyncIterator[str], on_end: Any, **kwargs: Any) -> None:
        super().__init__(content, **kwargs)
        self.on_end = on_end

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.on_end()


async def _merge(handles: list[Any]) -> AsyncIterator[tuple[int, Any]]:
    """(choice index, event) from every handle's stream, in arrival order."""
    if len(handles) == 1:
        async for event in handles[0].stream():
            yield 0, event
        return
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(index: int, handle: Any) -> None:
        try:
            async for event in handle.stream():
                queue.put_nowait((index, event))
        except Exception as error:
            queue.put_nowait((index, error))
        else:
            queue.put_nowait((index, done))

    tasks = [asyncio.create_task(pump(index, handle)) for index, handle in enumerate(handles)]
    try:
        remaining = len(tasks)
        while remaining:
            index, item = await queue.get()
            if item is done:
                remaining -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield index, item
    finally:
        for task in tasks:
            task.cancel()


def _sse(body: dict) -> str:
    return f"data: {json.dumps(body, separators=(',', ':'))}\n\n"


# ---------------------------------------------------------------------------------------------
# errors


def _error(status: int, message: str, param: str | None = None, code: str | None = None) -> JSONResponse:
    return JSONResponse(api.error_body(status, message, param, code), status_code=status)


def _add_error_handlers(app: FastAPI) -> None:
    async def validation(_: Request, error: RequestValidationError) -> JSONResponse:
        message, param = api.validation_error(list(error.errors()))
        return _error(400, message, param)

    async def bad_request(_: Request, error: RequestError) -> JSONResponse:
        return _error(400, str(error), error.param)

    async def model_not_found(_: Request, error: ModelNotFound) -> JSONResponse:
        return _error(404, str(error), "model", "model_not_found")

    async def queue_full(_: Request, error: QueueFull) -> JSONResponse:
        return _error(429, str(error) or "the server is at capacity; retry later", code="queue_full")

    async def engine_stopped(_: Request, error: EngineStopped) -> JSONResponse:
        return _error(503, str(error) or "the engine has stopped", code="engine_stopped")

    async def http_error(_: Request, error: StarletteHTTPException) -> JSONResponse:
        return _error(error.status_code, str(error.detail))

    async def internal_error(_: Request, error: Exception) -> JSONResponse:
        # Starlette still logs the traceback; the client gets the error in OpenAI's format
        return _error(500, f"internal error: {type(error).__name__}: {error}", code="internal_error")

    app.add_exception_handler(RequestValidationError, validation)
    app.add_exception_handler(RequestError, bad_request)
    app.add_exception_handler(ModelNotFound, model_not_found)
    app.add_exception_handler(QueueFull, queue_full)
    app.add_exception_handler(EngineStopped, engine_stopped)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(Exception, internal_error)


# ---------------------------------------------------------------------------------------------
# serving and shutdown


def bind_socket(host: str, port: int) -> socket.socket:
    """The listening address, taken before the model loads so a port in use fails fast and in one line."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a port in TIME_WAIT is free; one in use is not
    try:
        sock.bind((host, port))
    except OSError as error:
        sock.close()
        if error.errno == errno.EADDRINUSE:
            raise OSError(error.errno, f"port {port} on {host} is already in use; choose another with --port") from None
        raise OSError(error.errno, f"cannot listen on {host}:{port}: {error.strerror}") from None
    return sock


def run_server(
    app: FastAPI,
    host: str,
    port: int,
    engine: Any,
    *,
    sock: socket.socket | None = None,
    drain_timeout: float = DEFAULT_DRAIN_TIMEOUT,
) -> None:
    """Serve ``app`` until SIGTERM / SIGINT, then drain (see the module docstring); the engine is shut down."""
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level="warning",
        access_log=False,
        lifespan="off",
        timeout_graceful_shutdown=GRACEFUL_CLOSE_SECONDS,
    )
    server = _DrainingServer(config, app, engine, drain_timeout)
    sock = sock if sock is not None else bind_socket(host, port)
    try:
        server.run(sockets=[sock])
    finally:
        engine.shutdown(drain=False)
        sock.close()


class _DrainingServer(uvicorn.Server):
    """uvicorn's server with a drain on the first signal, and no re-raised signal afterwards (uvicorn
    raises the caught signal again once it has stopped, which would end the process with -SIGTERM)."""

    def __init__(self, config: Any, app: FastAPI, engine: Any, drain_timeout: float) -> None:
        super().__init__(config)
        self.served_app, self.engine, self.drain_timeout = app, engine, drain_timeout
        self.signals_received = 0

    @contextmanager
    def capture_signals(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        originals = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in originals.items():
                signal.signal(sig, handler)

    def handle_exit(self, sig: int, frame: Any) -> None:
        self.signals_received += 1
        if self.signals_received == 1:
            self.served_app.state.is_draining = True
            threading.Thread(target=self._drain, args=(signal.Signals(sig).name,), daemon=True).start()
        elif self.signals_received == 2:  # abort what runs now: the streams still end cleanly, with 'abort'
            threading.Thread(target=self._abort, daemon=True).start()
        else:  # a third: close the connections as they are
            self.force_exit = self.should_exit = True

    def _abort(self) -> None:
        print("hybridlm serve: aborting the running requests", file=sys.stderr, flush=True)
        try:
            self.engine.shutdown(drain=False)
        finally:
            self.should_exit = True

    def _drain(self, signal_name: str) -> None:
        running = self.engine.stats().get("running", 0)
        print(
            f"hybridlm serve: {signal_name}: stopping; {running} running request(s) get up to "
            f"{self.drain_timeout:g}s to finish",
            file=sys.stderr,
            flush=True,
        )
        try:
            self.engine.shutdown(drain=True, timeout=self.drain_timeout)
        finally:
            self.should_exit = True
