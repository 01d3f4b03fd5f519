"""The HTTP side: routes, the API key, bounded bodies, CORS, and every error as OpenAI's
error body (never a traceback). Generation happens in the scheduler's thread; the event
loop only validates, renders prompts (in a thread pool) and relays pieces."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import time
from collections.abc import AsyncIterator

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from diptych.errors import (ContextOverflowError, DiptychError, InvalidArgumentError,
                            NumericalError)
from diptych.inference.constraint import GrammarConstraint, JsonConstraint
from diptych.inference.generate import Piece
from diptych.inference.speculative import DEFAULT_LOOKUP_NGRAM
from diptych.text.chat_prompt import chat_ids

from .errors import APIError, invalid
from .responses import DONE, Envelope, chat_logprobs, sse, text_logprobs, usage
from .scheduler import END, Job, Scheduler, Speculation
from .slots import SlotPool
from .tool_calls import ToolCallParser, collect
from .tool_grammar import constrains, tool_constraint
from .validate import GenerationRequest, chat_request, completion_request, parse_body

log = logging.getLogger("diptych.server")

MAX_BODY_BYTES = 4 << 20


def error_response(exc: APIError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status)


def api_error(exc: BaseException) -> APIError:
    """What the client is told about an exception raised while serving it."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, ContextOverflowError):
        return invalid(str(exc), "messages", "context_length_exceeded")
    if isinstance(exc, DiptychError) and not isinstance(exc, NumericalError):
        return invalid(str(exc))
    return APIError(500, "the server failed to generate a reply; its log has the details",
                    kind="server_error")


class APIKey:
    """ASGI middleware: with a key set, every HTTP request needs `Authorization: Bearer KEY`
    (compared in constant time)."""

    def __init__(self, app, key: str | None):
        self.app, self.key = app, key

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and self.key is not None:
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not hmac.compare_digest(given, b"Bearer " + self.key.encode()):
                await error_response(APIError(
                    401, "Incorrect API key provided: send 'Authorization: Bearer <key>'",
                    code="invalid_api_key"))(scope, receive, send)
                return
        await self.app(scope, receive, send)


class EventStream:
    """A server-sent event response over `events`; however it ends (done, error, or the
    client gone), the job is cancelled so its slot frees at once."""

    def __init__(self, events: AsyncIterator[bytes], job: Job, watcher: asyncio.Task):
        self.events, self.job, self.watcher = events, job, watcher

    async def __call__(self, scope, receive, send):
        try:
            await send({"type": "http.response.start", "status": 200,
                        "headers": [(b"content-type", b"text/event-stream; charset=utf-8"),
                                    (b"cache-control", b"no-cache")]})
            async for data in self.events:
                await send({"type": "http.response.body", "body": data, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except OSError:
            pass  # the client went away
        finally:
            self.job.cancel()
            self.watcher.cancel()


async def _watch_disconnect(receive, job: Job) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass
    job.cancel()


async def _read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    too_big = APIError(413, f"the request body is larger than {limit} bytes",
                       code="request_too_large")
    if declared is not None:
        if not declared.isdigit():
            raise invalid("the Content-Length header is not a number")
        if int(declared) > limit:
            raise too_big
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_big
        chunks.append(chunk)
    return b"".join(chunks)


class Server:
    """The server for one loaded model: `parallel` cache slots, the worker thread, the app.
    `speculative`: how requests decode unless they say otherwise ("draft": the model's draft,
    "lookup", or None); `lookup_ngram`: prompt lookup's n-gram unless a request gives one."""

    def __init__(self, model, *, parallel: int = 1, api_key: str | None = None,
                 cors: list[str] | None = None, max_body_bytes: int = MAX_BODY_BYTES,
                 speculative: str | None = None, lookup_ngram: int = DEFAULT_LOOKUP_NGRAM):
        self.model = model
        self.speculative, self.lookup_ngram = speculative, lookup_ngram
        self.slots = SlotPool(model.engine, parallel,
                              model.draft.engine if model.draft is not None else None)
        self.scheduler = Scheduler(model, self.slots)
        self.max_body_bytes = max_body_bytes
        self.created = int(time.time())
        self.app = Starlette(
            routes=[Route("/health", self.health),
                    Route("/v1/models", self.models),
                    Route("/v1/models/{name:path}", self.one_model),
                    Route("/v1/chat/completions", self.chat_completions, methods=["POST"]),
                    Route("/v1/completions", self.completions, methods=["POST"])],
            middleware=[Middleware(CORSMiddleware, allow_origins=cors or [],
                                   allow_methods=["GET", "POST", "OPTIONS"],
                                   allow_headers=["Authorization", "Content-Type"]),
                        Middleware(APIKey, key=api_key)],
            exception_handlers={APIError: lambda r, e: error_response(e),
                                HTTPException: self._http_error,
                                Exception: lambda r, e: error_response(api_error(e))},
            lifespan=self._lifespan)

    @contextlib.asynccontextmanager
    async def _lifespan(self, app):
        self.scheduler.start()
        yield
        self.scheduler.stop()

    @staticmethod
    def _http_error(request: Request, exc: HTTPException) -> JSONResponse:
        if exc.status_code == 404:
            message, code = f"Unknown request URL: {request.method} {request.url.path}", \
                "unknown_url"
        else:
            message, code = f"{request.method} is not allowed on {request.url.path}", None
        return error_response(APIError(exc.status_code, message, code=code))

    # -- routes --------------------------------------------------------------------------------
    async def health(self, request: Request) -> JSONResponse:
        busy = self.slots.busy
        return JSONResponse({"status": "ok", "slots_idle": len(self.slots) - busy,
                             "slots_processing": busy,
                             "requests_waiting": self.scheduler.waiting,
                             "tokens_generated": self.scheduler.tokens_generated,
                             "verify_passes": self.scheduler.verify_passes,
                             "tokens_drafted": self.scheduler.tokens_drafted,
                             "drafts_accepted": self.scheduler.drafts_accepted,
                             "tokens_after_cancel": self.scheduler.tokens_after_cancel})

    def _model_card(self) -> dict:
        return {"id": self.model.name, "object": "model", "created": self.created,
                "owned_by": "diptych"}

    async def models(self, request: Request) -> JSONResponse:
        return JSONResponse({"object": "list", "data": [self._model_card()]})

    async def one_model(self, request: Request) -> JSONResponse:
        name = request.path_params["name"]
        if name != self.model.name:
            raise APIError(404, f"The model '{name}' does not exist", param="model",
                           code="model_not_found")
        return JSONResponse(self._model_card())

    async def chat_completions(self, request: Request):
        body = parse_body(await _read_body(request, self.max_body_bytes))
        return await self._generate(request, chat_request(body, self.model.name,
                                                          self.model.n_ctx))

    async def completions(self, request: Request):
        body = parse_body(await _read_body(request, self.max_body_bytes))
        return await self._generate(request, completion_request(body, self.model.name,
                                                                 self.model.n_ctx))

    # -- generation ----------------------------------------------------------------------------
    def _prepare(self, req: GenerationRequest) -> tuple[list[int], GrammarConstraint | None]:
        """The prompt's token ids and the output's grammar (slow work: off the event loop)."""
        m = self.model
        try:
            constraint = None if req.tools is None else tool_constraint(
                m.tokenizer, m.config.vocab_size, req.tools, req.tool_choice, req.strict,
                req.json_schema)
        except InvalidArgumentError as exc:
            raise invalid(str(exc), "tools") from None
        if constraint is None and req.json_schema is not None:
            try:
                constraint = JsonConstraint(m.tokenizer, m.config.vocab_size, req.json_schema)
            except InvalidArgumentError as exc:
                raise invalid(str(exc), "response_format") from None
        if req.chat:
            return chat_ids(m.tokenizer, req.messages, tools=req.tools), constraint
        if isinstance(req.prompt, str):
            return m.tokenize(req.prompt), constraint
        bad = [t for t in req.prompt if not 0 <= t < m.config.vocab_size]
        if bad:
            raise invalid(f"token id {bad[0]} is outside the vocabulary "
                          f"(0..{m.config.vocab_size - 1})", "prompt")
        return req.prompt, constraint

    def _speculation(self, req: GenerationRequest) -> Speculation | None:
        """How the request decodes: its own speculative options, else the server's (plain
        where it asks for logprobs, which only plain decoding gives)."""
        asked = req.speculative != "default"
        mode = req.speculative if asked else self.speculative
        if mode is not None and req.logprobs is not None:
            if asked:
                raise invalid("'logprobs' are not available with speculative decoding: "
                              "send 'speculative': 'none'", "speculative")
            mode = None
        if mode is None:
            for name in ("draft_max", "lookup_ngram"):
                if getattr(req, name) is not None:
                    raise invalid(f"'{name}' is an option of speculative decoding, which this "
                                  f"request does not use", name)
            return None
        if mode == "draft" and self.model.draft is None:
            raise invalid("'speculative': 'draft' needs a server started with a draft model "
                          "(--draft SMALL.gguf)", "speculative")
        room = self.model.engine.max_rollback
        draft_max = room if req.draft_max is None else req.draft_max
        if not 1 <= draft_max <= room:
            raise invalid(f"'draft_max' is at most {room} here (the server's --draft-max)",
                          "draft_max")
        return Speculation(mode, draft_max, req.lookup_ngram or self.lookup_ngram)

    async def _generate(self, request: Request, req: GenerationRequest):
        try:
            ids, constraint = await run_in_threadpool(self._prepare, req)
            if len(ids) >= self.model.n_ctx:
                raise invalid(f"the prompt has {len(ids)} tokens but the context holds "
                              f"{self.model.n_ctx}", "messages" if req.chat else "prompt",
                              "context_length_exceeded")
            params = self.model.sampling.with_overrides(**req.sampling)
        except DiptychError as exc:
            raise api_error(exc) from None
        job = Job(ids, params, req.max_tokens or self.model.n_ctx, req.stop, req.logprobs,
                  constraint, self._speculation(req))
        watcher = asyncio.create_task(_watch_disconnect(request.receive, job))
        self.scheduler.submit(job)
        first = await job.next()
        if first is END or isinstance(first, BaseException):
            watcher.cancel()
            raise api_error(first if first is not END else
                            invalid("the request was cancelled"))
        reply = _Reply(self.model, req, job, Envelope(req.chat, self.model.name))
        if req.stream:
            return EventStream(reply.events(first), job, watcher)
        try:
            return JSONResponse(await reply.whole(first))
        finally:
            job.cancel()
            watcher.cancel()


class _Reply:
    """One request's pieces turned into OpenAI's response, whole or as a stream."""

    def __init__(self, model, req: GenerationRequest, job: Job, envelope: Envelope):
        self.model, self.req, self.job, self.envelope = model, req, job, envelope
        self.tools = ToolCallParser({t["function"]["name"] for t in req.tools},
                                    constrains(req.tool_choice, req.strict)) \
            if req.tools else None
        self.generated = 0
        self.text_offset = 0

    async def _pieces(self, first: Piece):
        item = first
        while item is not END:
            if isinstance(item, BaseException):
                raise api_error(item)
            self.generated += len(item.token_ids)
            yield item
            item = await self.job.next()

    def _usage(self) -> dict:
        return usage(len(self.job.ids), self.generated, self.job.cached_tokens)

    def _logprobs(self, piece_logprobs):
        if piece_logprobs is None:
            return None
        tok = self.model.tokenizer
        # the end-of-generation token is no part of the text, as in OpenAI's logprobs
        piece_logprobs = [t for t in piece_logprobs if t.token_id not in tok.eog_ids]
        if self.req.chat:
            return chat_logprobs(tok, piece_logprobs)
        return text_logprobs(tok, piece_logprobs, self.text_offset)

    async def whole(self, first: Piece) -> dict:
        texts, lps, finish = [], [], None
        async for piece in self._pieces(first):
            texts.append(piece.text)
            lps += piece.logprobs or []
            finish = piece.finish_reason or finish
        text, calls = "".join(texts), []
        if self.tools is not None:
            content, deltas = self.tools.feed(text)
            rest, more = self.tools.finish()
            text, calls = content + rest, collect(deltas + more)
            if calls:   # a reply cut by max_tokens stays "length", as OpenAI's does
                finish = "tool_calls" if finish != "length" else finish
                text = text if text.strip() else None
        logprobs = self._logprobs(lps) if self.req.logprobs is not None else None
        return self.envelope.whole(text, finish, self._usage(), logprobs, calls)

    async def events(self, first: Piece) -> AsyncIterator[bytes]:
        env, req = self.envelope, self.req
        with_usage = req.include_usage
        try:
            if req.chat:
                yield env.chunk({"role": "assistant", "content": ""}, with_usage=with_usage)
            finish = None
            async for piece in self._pieces(first):
                text, deltas = piece.text, []
                if self.tools is not None:
                    text, deltas = self.tools.feed(text)
                    if piece.finish_reason:
                        rest, more = self.tools.finish()
                        text, deltas = text + rest, deltas + more
                for delta in deltas:
                    yield env.chunk({"tool_calls": [delta]}, with_usage=with_usage)
                lp = self._logprobs(piece.logprobs)
                self.text_offset += len(piece.text)
                if text or (lp and any(lp.values())):
                    delta = {"content": text} if req.chat else {"text": text}
                    yield env.chunk(delta, logprobs=lp, with_usage=with_usage)
                finish = piece.finish_reason or finish
            if self.tools is not None and self.tools.calls and finish != "length":
                finish = "tool_calls"
            yield env.chunk({} if req.chat else {"text": ""}, finish, with_usage=with_usage)
            if with_usage:
                yield env.usage_chunk(self._usage())
        except APIError as exc:
            yield sse(exc.body())   # the status line went out already
        yield DONE


def serve(model, *, host: str = "127.0.0.1", port: int = 8080, parallel: int = 1,
          api_key: str | None = None, cors: list[str] | None = None,
          speculative: str | None = None, lookup_ngram: int = DEFAULT_LOOKUP_NGRAM,
          announce=print) -> None:
    """Serve `model` until interrupted. The socket is bound before anything is announced,
    so a port in use is an error here, not a line in a log."""
    import socket

    import uvicorn

    from diptych.errors import InvalidArgumentError

    server = Server(model, parallel=parallel, api_key=api_key, cors=cors,
                    speculative=speculative, lookup_ngram=lookup_ngram)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        sock = socket.create_server((host, port), family=family)
    except OSError as exc:
        raise InvalidArgumentError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") \
            from None
    bound = sock.getsockname()[1]
    shown = f"[{host}]" if family == socket.AF_INET6 else host
    base = f"http://{shown}:{bound}/v1"
    auth = " -H 'Authorization: Bearer $DIPTYCH_API_KEY'" if api_key else ""
    drafts = {"draft": f", drafted by {model.draft.name if model.draft else ''}",
              "lookup": ", prompt lookup drafts", None: ""}[speculative]
    announce(f"serving {model.name} at {base} ({parallel} slot{'s' * (parallel > 1)}, "
             f"n_ctx {model.n_ctx}{drafts}); Ctrl+C stops")
    announce(f"try: curl {base}/chat/completions -H 'Content-Type: application/json'{auth} "
             f"-d '{{\"model\": \"{model.name}\", \"messages\": [{{\"role\": \"user\", "
             f"\"content\": \"Hello\"}}]}}'")
    config = uvicorn.Config(server.app, log_level="warning", access_log=False,
                            timeout_graceful_shutdown=2)
    uvicorn.Server(config).run(sockets=[sock])
