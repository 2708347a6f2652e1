"""The OpenAI-compatible HTTP server: a thin FastAPI adapter over BatchEngine.

    POST /v1/completions, /v1/chat/completions   (stream: server-sent events ending `data: [DONE]`)
    GET  /v1/models, /health, /metrics

Handlers tokenize in a worker thread, submit to the engine thread, and await the engine's
updates on an asyncio queue, so the event loop never waits on a forward. A client that goes away
mid-request has its request cancelled (its KV cache goes back to the pool before the next step).
Every error is OpenAI-shaped: `{"error": {"message", "type", "param", "code"}}`.
"""
from __future__ import annotations

import asyncio
import json
import re
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from fastapi import Request as HTTPRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from fastdecode.batch import BatchEngine, QueueFullError, Request, Update
from fastdecode.drafters import METHODS
from fastdecode.llm import LLM
from fastdecode.sampling import SamplingParams
from fastdecode.server.metrics import ServerMetrics
from fastdecode.server.protocol import GREEDY_BELOW, ChatRequest, CompletionRequest, SamplingFields

MAX_BODY_BYTES = 2 * 1024 * 1024


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code


def error_response(status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                   code: str | None = None, headers: dict[str, str] | None = None) -> JSONResponse:
    body = {"error": {"message": message, "type": type_, "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


class Guard:
    """ASGI middleware run before routing: the API key (401) and the body size limit (413), the
    latter also for bodies sent without a Content-Length."""

    def __init__(self, app: Any, api_key: str | None, max_body_bytes: int) -> None:
        self.app, self.api_key, self.max_body_bytes = app, api_key, max_body_bytes

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        if self.api_key is not None and scope["path"].startswith("/v1"):
            given = headers.get("authorization", "")
            if not secrets.compare_digest(given.encode(), f"Bearer {self.api_key}".encode()):
                what = "no API key was given" if not given else "the API key is wrong"
                response = error_response(401, f"{what}: send 'Authorization: Bearer <key>'", code="invalid_api_key")
                return await response(scope, receive, send)
        declared = headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_body_bytes:
            return await self._too_large(scope, receive, send)
        body, more = b"", scope["method"] in ("POST", "PUT", "PATCH")
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client left before sending the body
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.max_body_bytes:
                return await self._too_large(scope, receive, send)
        replayed = False

        async def replay() -> dict:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # later calls: wait for the disconnect

        await self.app(scope, replay, send)

    async def _too_large(self, scope: dict, receive: Callable, send: Callable) -> None:
        response = error_response(413, f"the request body is larger than {self.max_body_bytes} bytes",
                                  code="request_too_large")
        await response(scope, receive, send)


def create_app(
    llm: LLM, model_name: str | None = None, method: str = "auto", max_batch: int = 8, max_waiting: int = 64,
    api_key: str | None = None, max_body_bytes: int = MAX_BODY_BYTES, engine_thread: bool = True,
    prefill_chunk: int = 128,
) -> FastAPI:
    """The server app for `llm`. With `engine_thread` its engine thread starts and stops with the
    app's lifespan; without, the caller runs `app.state.engine.run()` on a thread of its choosing."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; known methods: {', '.join(METHODS)}")
    engine = BatchEngine(llm, max_batch=max_batch, max_waiting=max_waiting, prefill_chunk=prefill_chunk)
    metrics = ServerMetrics(engine)
    name = model_name or _model_name(llm.model_path)
    aliases = {name, str(llm.model_path)}

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if engine_thread:
            engine.start()
        yield
        if engine_thread:
            engine.stop()

    app = FastAPI(title="fastdecode", version="0.1.0", lifespan=lifespan)
    app.state.engine, app.state.metrics = engine, metrics
    _add_error_handlers(app)
    ctx = _Context(llm, engine, metrics, name, aliases, method)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, http: HTTPRequest) -> Response:
        ctx.check_model(body.model)
        prompt = _single_prompt(body.prompt)
        text, ids = await ctx.encode(prompt, "prompt")
        return await ctx.serve(http, body, "completion", text, ids, body.max_tokens)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest, http: HTTPRequest) -> Response:
        ctx.check_model(body.model)
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in body.messages]
        try:
            ids = await run_in_threadpool(engine.chat_ids, messages)
        except Exception as exc:  # the model's chat template refused the conversation
            raise APIError(400, f"the chat template could not render these messages: {exc}", param="messages") from exc
        text, ids = await ctx.encode(ids, "messages")
        max_tokens = body.max_completion_tokens or body.max_tokens
        return await ctx.serve(http, body, "chat", text, ids, max_tokens)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        card = {"id": name, "object": "model", "created": ctx.created, "owned_by": "fastdecode",
                "max_model_len": llm.model.max_len}
        return {"object": "list", "data": [card]}

    @app.get("/health")
    async def health() -> Response:
        if not engine.alive:
            return error_response(503, "the engine thread is not running", "server_error", code="engine_down")
        return JSONResponse({"status": "ok", "running": engine.num_running, "waiting": engine.num_waiting})

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    app.add_middleware(Guard, api_key=api_key, max_body_bytes=max_body_bytes)
    return app


class _Context:
    """What the handlers share: the engine, the metrics and the served model's name."""

    def __init__(self, llm: LLM, engine: BatchEngine, metrics: ServerMetrics, name: str, aliases: set[str],
                 method: str) -> None:
        self.llm, self.engine, self.metrics, self.name, self.aliases = llm, engine, metrics, name, aliases
        self.method, self.created = method, int(time.time())

    def check_model(self, model: str) -> None:
        if model not in self.aliases:
            raise APIError(404, f"the model {model!r} does not exist; this server serves {self.name!r}",
                           param="model", code="model_not_found")

    async def encode(self, prompt: str | list[int], param: str) -> tuple[str, list[int]]:
        try:
            return await run_in_threadpool(self.engine.encode, prompt)
        except ValueError as exc:
            code = "context_length_exceeded" if "context length" in str(exc) else None
            raise APIError(400, str(exc), param=param, code=code) from exc

    async def serve(self, http: HTTPRequest, body: SamplingFields, kind: str, text: str, ids: list[int],
                    max_tokens: int | None) -> Response:
        method = body.method or self.method
        if method not in METHODS:
            raise APIError(400, f"unknown method {method!r}; known methods: {', '.join(METHODS)}", param="method")
        room = self.llm.model.max_len - len(ids)
        params = _sampling_params(body, room if max_tokens is None else max_tokens)
        loop, updates = asyncio.get_running_loop(), asyncio.Queue()
        request = Request(text, ids, params, method, lambda u: None)
        last: list[float | None] = [None]

        def on_update(update: Update) -> None:  # engine thread
            last[0] = self.metrics.observe(request, update, last[0])
            loop.call_soon_threadsafe(updates.put_nowait, update)

        request.on_update = on_update
        try:
            self.engine.submit(request)
        except QueueFullError as exc:
            raise APIError(429, f"the server is busy: {exc}", "server_busy", code="queue_full") from exc
        except RuntimeError as exc:
            raise APIError(503, str(exc), "server_error", code="engine_down") from exc
        reply = _Reply(kind, self.name, len(ids), body.include_usage)
        if body.stream:
            return StreamingResponse(self._stream(request, updates, reply), media_type="text/event-stream")
        return await self._complete(http, request, updates, reply)

    async def _stream(self, request: Request, updates: asyncio.Queue, reply: "_Reply") -> AsyncIterator[str]:
        done = False
        try:
            if reply.kind == "chat":
                yield reply.sse(reply.chunk({"role": "assistant", "content": ""}, None))
            while not done:
                update: Update = await updates.get()
                done = update.done
                if update.error:
                    yield reply.sse({"error": {"message": update.error, "type": "server_error", "param": None,
                                               "code": None}})
                    break
                finish = update.output.finish_reason if done else None
                if update.text or finish:
                    delta = {"content": update.text} if reply.kind == "chat" else update.text
                    yield reply.sse(reply.chunk({} if reply.kind == "chat" and not update.text else delta, finish))
                if done and reply.include_usage:
                    yield reply.sse(reply.usage_chunk(update.output))
            yield "data: [DONE]\n\n"
        finally:
            if not done:
                self._cancel(request)

    async def _complete(self, http: HTTPRequest, request: Request, updates: asyncio.Queue,
                        reply: "_Reply") -> Response:
        async def last_update() -> Update:
            while not (update := await updates.get()).done:
                pass
            return update

        result, gone = asyncio.ensure_future(last_update()), asyncio.ensure_future(_disconnected(http))
        try:
            await asyncio.wait({result, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
            if not result.done():
                result.cancel()
                self._cancel(request)
        if not result.done():
            return Response(status_code=499)  # the client has gone: nobody reads this
        update = result.result()
        if update.error:
            raise APIError(500, f"generation failed: {update.error}", "server_error")
        return JSONResponse(reply.whole(update.output))

    def _cancel(self, request: Request) -> None:
        request.cancel()
        self.metrics.requests.labels("cancelled").inc()


class _Reply:
    """Builds the OpenAI response objects of one request."""

    def __init__(self, kind: str, model: str, prompt_tokens: int, include_usage: bool) -> None:
        prefix = "chatcmpl" if kind == "chat" else "cmpl"
        self.kind, self.model, self.prompt_tokens, self.include_usage = kind, model, prompt_tokens, include_usage
        self.id, self.created = f"{prefix}-{uuid.uuid4().hex}", int(time.time())

    def usage(self, out: Any) -> dict[str, Any]:
        n = len(out.token_ids)
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": n, "total_tokens": self.prompt_tokens + n,
                "prompt_tokens_details": {"cached_tokens": out.metrics.cached_tokens}}

    def _head(self, obj: str) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def whole(self, out: Any) -> dict[str, Any]:
        if self.kind == "chat":
            choice = {"index": 0, "message": {"role": "assistant", "content": out.text},
                      "logprobs": None, "finish_reason": out.finish_reason}
            obj = "chat.completion"
        else:
            choice = {"index": 0, "text": out.text, "logprobs": None, "finish_reason": out.finish_reason}
            obj = "text_completion"
        return {**self._head(obj), "choices": [choice], "usage": self.usage(out)}

    def chunk(self, delta: dict[str, str] | str, finish: str | None) -> dict[str, Any]:
        if self.kind == "chat":
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            head = self._head("chat.completion.chunk")
        else:
            choice = {"index": 0, "text": delta, "logprobs": None, "finish_reason": finish}
            head = self._head("text_completion")
        extra = {"usage": None} if self.include_usage else {}
        return {**head, "choices": [choice], **extra}

    def usage_chunk(self, out: Any) -> dict[str, Any]:
        obj = "chat.completion.chunk" if self.kind == "chat" else "text_completion"
        return {**self._head(obj), "choices": [], "usage": self.usage(out)}

    @staticmethod
    def sse(data: dict[str, Any]) -> str:
        return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


async def _disconnected(http: HTTPRequest) -> None:
    """Return once the client has closed the connection (the request body has been read already)."""
    while (await http.receive())["type"] != "http.disconnect":
        pass


def _model_name(path: str) -> str:
    p = Path(str(path))
    return p.stem if p.suffix == ".gguf" else p.name


def _single_prompt(prompt: str | list[int] | list[str] | list[list[int]]) -> str | list[int]:
    if isinstance(prompt, str) or all(isinstance(t, int) for t in prompt):
        return prompt  # type: ignore[return-value]
    if len(prompt) != 1:
        raise APIError(400, f"a list of {len(prompt)} prompts was given; send exactly one prompt per request",
                       param="prompt")
    return prompt[0]  # type: ignore[return-value]


def _sampling_params(body: SamplingFields, max_tokens: int) -> SamplingParams:
    try:
        return SamplingParams(
            max_tokens=max_tokens, temperature=0.0 if body.temperature < GREEDY_BELOW else body.temperature, top_k=body.top_k, top_p=body.top_p,
            min_p=body.min_p, repetition_penalty=body.repetition_penalty, presence_penalty=body.presence_penalty,
            frequency_penalty=body.frequency_penalty, seed=body.seed, stop=body.stop,
        )
    except ValueError as exc:  # the protocol's limits should have caught it; name the field anyway
        found = re.match(r"invalid (\w+)=", str(exc))
        raise APIError(400, str(exc), param=found.group(1) if found else None) from exc


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(request: HTTPRequest, exc: APIError) -> Response:
        return error_response(exc.status, exc.message, exc.type, exc.param, exc.code)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: HTTPRequest, exc: RequestValidationError) -> Response:
        first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        loc = [str(part) for part in first.get("loc", ()) if part != "body"]
        param = ".".join(loc) or None
        if first.get("type") == "json_invalid":
            return error_response(400, f"the request body is not valid JSON: {first.get('msg')}")
        got = f" (got {json.dumps(first['input'], default=str)[:100]})" if "input" in first and param else ""
        message = f"{param or 'body'}: {first.get('msg')}{got}"
        return error_response(400, message, param=param)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: HTTPRequest, exc: StarletteHTTPException) -> Response:
        kinds = {404: "not_found", 405: "method_not_allowed"}
        return error_response(exc.status_code, str(exc.detail), code=kinds.get(exc.status_code))

    @app.exception_handler(Exception)
    async def crash(request: HTTPRequest, exc: Exception) -> Response:
        return error_response(500, f"internal error: {type(exc).__name__}: {exc}", "server_error")

