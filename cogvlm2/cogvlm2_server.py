"""An OpenAI-compatible HTTP server on ``CogVLM2Engine`` (FastAPI; run it with uvicorn, see run_server.py).

    app = create_app(engine, ServerSettings(media=MediaPolicy(media_root="videos")))

Endpoints: ``POST /v1/chat/completions`` (stream and non-stream), ``GET /v1/models``, ``GET /health``
(200 only once the engine's graphs are compiled), ``GET /metrics`` (Prometheus), ``POST /v1/frames``
(the frames the model looks at, as thumbnails with timestamps, for the page) and ``GET /`` (the page).

A thin layer: every request is one ``engine.submit``; the engine batches. Per request the server
resolves the media URL (cogvlm2_server_media), maps the messages (cogvlm2_server_api), turns the
handle's token ids into text (whole UTF-8 characters; ``stop`` strings cut the text and cancel the
sequence), and counts usage: ``prompt_tokens`` is the prompt the model saw (vision placeholder tokens
and history included), ``completion_tokens`` every token the model generated for the answer,
including the stop token when the answer ended on one (as vLLM counts), up to the token that
completed a ``stop`` string. A client that goes away cancels its sequence.

Status codes: 400 bad request (the plugin's CogVLM2Error family, e.g. a corrupt video or a prompt plus
max_tokens over the context, with the processor's message), 401 missing/wrong bearer key, 403 media
outside --media_root or remote media off, 404 unknown model, 413 media over the size limit, 422 wrong
field types (naming the field), 429 queue full (Retry-After), 503 still warming up, 500 a bug (with an
id that is also in the log).
"""
import asyncio
import importlib.resources
import json
import logging
import secrets
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import List, Optional

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from cogvlm2.cogvlm2_errors import CogVLM2Error
from cogvlm2.cogvlm2_server_api import (ChatCompletionRequest, FramesRequest, RequestError, to_engine_request)
from cogvlm2.cogvlm2_server_media import MediaError, MediaPolicy, frame_thumbnails, resolve_media
from cogvlm2.cogvlm2_server_metrics import CONTENT_TYPE, ServerMetrics
from cogvlm2.cogvlm2_tokenizer import StreamDecoder

__all__ = ["create_app", "ServerSettings"]

logger = logging.getLogger("cogvlm2.server")


@dataclass
class ServerSettings:
    model_name: str = "cogvlm2-video"
    api_key: Optional[str] = None           # requests must send "Authorization: Bearer <key>"
    max_queue: int = 64                     # requests admitted beyond the batch slots; more get 429
    media: MediaPolicy = field(default_factory=MediaPolicy)
    warmup: bool = True                     # compile both graphs at start-up (/health waits for it)

    @property
    def max_body_bytes(self) -> int:
        """A JSON body may carry one media item as base64 (4/3 of its size) plus 1 MB of text."""
        return self.media.max_bytes * 4 // 3 + 2 ** 20


class APIError(Exception):
    def __init__(self, status: int, message: str, kind: str, param: Optional[str] = None, headers=None):
        super().__init__(message)
        self.status, self.kind, self.param, self.headers = status, kind, param, headers


def _error_body(message: str, kind: str, param=None, code=None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def _field(loc) -> str:
    """('body', 'messages', 0, 'content', 1, 'type') -> 'messages[0].content[1].type'"""
    text = ""
    for part in loc:
        if part == "body" or isinstance(part, str) and ("[" in part or part in _UNION_BRANCHES):
            continue                  # pydantic's names of union branches, not fields
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text or "body"


_DONE = object()
_UNION_BRANCHES = ("str", "list", "int", "float", "bool", "none")


class _BodyLimit:
    """ASGI middleware: a body whose Content-Length is over the limit gets 413 before it is read."""

    def __init__(self, app, max_bytes: int, media_bytes: int, on_refuse):
        self.app, self.max_bytes, self.media_bytes, self.on_refuse = app, max_bytes, media_bytes, on_refuse

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            length = dict(scope["headers"]).get(b"content-length", b"")
            if length.isdigit() and int(length) > self.max_bytes:
                self.on_refuse()
                message = (f"the request body is {int(length) / 2 ** 20:.1f} MB, more than this server takes "
                           f"({self.max_bytes / 2 ** 20:.1f} MB: media up to {self.media_bytes / 2 ** 20:.0f} MB, "
                           "--max_media_mb)")
                response = JSONResponse(_error_body(message, "invalid_request_error"), status_code=413)
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


class _Run:
    """One engine request as the server sees it: token ids -> text pieces, stop strings, usage."""

    def __init__(self, handle, tokenizer, stop_ids, stop_strings: List[str], received: float):
        self.handle = handle
        self.stop_ids = frozenset(int(i) for i in stop_ids)
        self.stop_strings = stop_strings
        self.received = received
        self.decoder = StreamDecoder(tokenizer, skip_special_tokens=True)
        self.queue: asyncio.Queue = asyncio.Queue()
        self.completion_tokens = 0
        self.finish_reason: Optional[str] = None
        self.first_token: Optional[float] = None
        self._lookahead = None
        loop = asyncio.get_running_loop()
        threading.Thread(target=self._pump, args=(loop,), daemon=True,
                         name=f"cogvlm2-pump-{handle.request_id}").start()

    def _pump(self, loop):
        """Thread: the handle's tokens into the asyncio queue (the engine's handle blocks)."""
        try:
            for token in self.handle.tokens():
                loop.call_soon_threadsafe(self.queue.put_nowait, token)
            last = _DONE
        except BaseException as error:  # pylint: disable=broad-except  (delivered to the request)
            last = error
        try:
            loop.call_soon_threadsafe(self.queue.put_nowait, last)
        except RuntimeError:            # the event loop is gone (server shut down)
            pass

    async def start(self):
        """Wait for the first token (or the request's error, raised here, before any byte is sent)."""
        self._lookahead = await self.queue.get()
        if isinstance(self._lookahead, BaseException):
            raise self._lookahead

    async def _items(self):
        item = self._lookahead
        while True:
            if item is _DONE:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
            item = await self.queue.get()

    def _cut(self, pending: str):
        """(text to emit, text to hold back, stop string hit?)"""
        hits = [i for i in (pending.find(s) for s in self.stop_strings) if i >= 0]
        if hits:
            return pending[:min(hits)], "", True
        hold = 0
        for stop in self.stop_strings:          # a suffix that may grow into a stop string
            for size in range(min(len(stop) - 1, len(pending)), hold, -1):
                if pending.endswith(stop[:size]):
                    hold = size
                    break
        return pending[:len(pending) - hold], pending[len(pending) - hold:], False

    async def pieces(self):
        """Text pieces of the answer; afterwards ``finish_reason`` and ``completion_tokens`` are set."""
        pending = ""
        async for token in self._items():
            self.completion_tokens += 1
            if self.first_token is None:
                self.first_token = time.perf_counter()
            if token in self.stop_ids:
                self.finish_reason = "stop"
                break
            pending += self.decoder.push([int(token)])
            text, pending, hit = self._cut(pending)
            if text:
                yield text
            if hit:
                self.finish_reason = "stop"
                self.handle.cancel()
                return
        text, _, hit = self._cut(pending + self.decoder.flush())
        if text:
            yield text
        if self.finish_reason is None:
            reason = "stop" if hit else (await asyncio.to_thread(self.handle.result)).finish_reason
            self.finish_reason = "stop" if reason == "stop" else "length"

    def usage(self) -> dict:
        prompt = self.handle.prompt_tokens
        return {"prompt_tokens": prompt, "completion_tokens": self.completion_tokens,
                "total_tokens": prompt + self.completion_tokens}

    def media_info(self) -> dict:
        return {"frames": self.handle.frames, "frame_indices": self.handle.frame_indices}


def _release_when_done(handle, media):
    """Delete a temporary media file once the engine cannot read it any more."""
    if media is None or not media.temporary:
        return
    if handle is None or handle.done():
        media.release()
        return

    def wait():
        try:
            handle.result(timeout=600)
        except BaseException:  # pylint: disable=broad-except  (only waiting)
            pass
        media.release()
    threading.Thread(target=wait, daemon=True, name="cogvlm2-media-release").start()


def create_app(engine, settings: Optional[ServerSettings] = None) -> FastAPI:
    """The FastAPI app serving ``engine`` (which the caller owns and closes)."""
    settings = settings or ServerSettings()
    metrics = ServerMetrics(engine)
    state = {"ready": not settings.warmup, "inflight": 0, "created": int(time.time())}
    capacity = engine.max_batch_size + settings.max_queue
    stop_ids = engine.model.config.stop_token_ids

    async def lifespan(_app):
        if settings.warmup:
            async def warm():
                await asyncio.to_thread(engine.warmup)
                state["ready"] = True
                logger.info("ready: both graphs compiled")
            task = asyncio.create_task(warm())
        yield
        if settings.warmup and not task.done():
            task.cancel()

    app = FastAPI(title="CogVLM2-Video (MindSpore)", lifespan=lifespan, docs_url=None, redoc_url=None)

    def error_response(status: int, message: str, kind: str, param=None, headers=None) -> JSONResponse:
        metrics.count(status, kind)
        return JSONResponse(_error_body(message, kind, param), status_code=status, headers=headers)

    @app.exception_handler(APIError)
    async def api_error(_request, err: APIError):
        return error_response(err.status, str(err), err.kind, err.param, err.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_request, err: RequestValidationError):
        errors = err.errors()
        if any(e.get("type") == "json_invalid" for e in errors):
            detail = next(e for e in errors if e.get("type") == "json_invalid")
            return error_response(400, f"the body is not valid JSON: {detail.get('ctx', {}).get('error', '')}"
                                  .rstrip(": "), "invalid_request_error")
        # of a union's alternatives, the deepest error is the one that names the real problem
        errors = sorted(errors, key=lambda e: -len(e["loc"]))
        errors = [e for e in errors if len(e["loc"]) == len(errors[0]["loc"])] if errors else errors
        text = "; ".join(f"{_field(e['loc'])}: {e['msg']}" for e in errors[:5])
        return error_response(422, text, "invalid_request_error", _field(errors[0]["loc"]) if errors else None)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request, err: StarletteHTTPException):
        return error_response(err.status_code, str(err.detail), "invalid_request_error")

    def internal(err: Exception) -> APIError:
        error_id = uuid.uuid4().hex[:12]
        logger.error("internal error %s: %r", error_id, err, exc_info=err)
        return APIError(500, f"internal server error (id {error_id}; the server log has the details)", "server_error")

    @app.exception_handler(Exception)
    async def internal_error(_request, err: Exception):
        return await api_error(_request, internal(err))

    app.add_middleware(_BodyLimit, max_bytes=settings.max_body_bytes, media_bytes=settings.media.max_bytes,
                       on_refuse=lambda: metrics.count(413, "invalid_request_error"))

    async def authorized(request: Request):
        if settings.api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, key = header.partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(key.strip().encode(), settings.api_key.encode()):
            raise APIError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'",
                           "authentication_error", headers={"WWW-Authenticate": "Bearer"})

    def check_ready():
        if not state["ready"]:
            raise APIError(503, "the model is warming up (compiling its graphs); retry in a few seconds",
                           "server_error", headers={"Retry-After": "2"})

    # ----------------------------------------------------------------------------- plain endpoints
    @app.get("/health")
    async def health():
        if not state["ready"]:
            return JSONResponse({"status": "warming up"}, status_code=503)
        stats = engine.snapshot()
        return {"status": "ok", "running": stats.running, "waiting": stats.waiting}

    @app.get("/v1/models", dependencies=[Depends(authorized)])
    async def models():
        return {"object": "list", "data": [{"id": settings.model_name, "object": "model",
                                            "created": state["created"], "owned_by": "cogvlm2-mindspore"}]}

    @app.get("/metrics", dependencies=[Depends(authorized)])
    async def prometheus():
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/", response_class=HTMLResponse)
    async def page():
        return importlib.resources.files("cogvlm2").joinpath("web", "index.html").read_text(encoding="utf-8")

    @app.post("/v1/frames", dependencies=[Depends(authorized)])
    async def frames(body: FramesRequest):
        media = None
        try:
            media = await resolve_media(body.url, body.type, settings.media, "url")
            found = await asyncio.to_thread(frame_thumbnails, engine.processor, media.path)
        except MediaError as err:
            raise APIError(err.status, str(err), "invalid_request_error", err.param) from None
        except CogVLM2Error as err:
            raise APIError(400, " ".join(str(err).split()), "invalid_request_error", "url") from None
        except Exception as err:  # pylint: disable=broad-except
            raise internal(err) from None
        finally:
            if media is not None:
                media.release()
        return {"frames": found}

    # ----------------------------------------------------------------------------- chat completions
    @app.post("/v1/chat/completions", dependencies=[Depends(authorized)])
    async def chat(body: ChatCompletionRequest, request: Request):
        received = time.perf_counter()
        check_ready()
        if body.model not in (None, settings.model_name):
            raise APIError(404, f"model {body.model!r} is not served here; use {settings.model_name!r} "
                                "(GET /v1/models)", "invalid_request_error", "model")
        if state["inflight"] >= capacity:
            raise APIError(429, f"the server is busy ({state['inflight']} requests in flight, at most {capacity}); "
                                "retry later", "rate_limit_error", headers={"Retry-After": "1"})
        state["inflight"] += 1
        handle = media = None
        keep_slot = False
        try:
            try:
                wanted = to_engine_request(body)
                if wanted.media_url is not None:
                    media = await resolve_media(wanted.media_url, wanted.media_kind, settings.media,
                                                wanted.media_param)
                path = media.path if media else None
                handle = engine.submit(wanted.text, video=path if wanted.media_kind == "video" else None,
                                       image=path if wanted.media_kind == "image" else None,
                                       history=wanted.history, request_id=f"chatcmpl-{uuid.uuid4().hex[:24]}",
                                       **wanted.options)
                run = _Run(handle, engine.tokenizer, stop_ids, wanted.stop, received)
                await run.start()
            except RequestError as err:
                raise APIError(400, str(err), "invalid_request_error", err.param) from None
            except MediaError as err:
                raise APIError(err.status, str(err), "invalid_request_error", err.param) from None
            except CogVLM2Error as err:
                raise APIError(400, " ".join(str(err).split()), "invalid_request_error") from None
            except Exception as err:  # pylint: disable=broad-except  (a bug: 500, never a dead server)
                raise internal(err) from None
            if body.stream:
                keep_slot = True
                return StreamingResponse(stream(run, body, media), media_type="text/event-stream",
                                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
            return await complete(run, body, request)
        finally:
            if not keep_slot:
                state["inflight"] -= 1
                if handle is not None and not handle.done():
                    handle.cancel()
                _release_when_done(handle, media)

    def chunk(run: _Run, delta: dict, finish=None, **extra) -> str:
        data = {"id": run.handle.request_id, "object": "chat.completion.chunk", "created": int(time.time()),
                "model": settings.model_name,
                "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}], **extra}
        return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"

    async def stream(run: _Run, body: ChatCompletionRequest, media):
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        extra = {"usage": None} if include_usage else {}
        finished = False
        try:
            yield chunk(run, {"role": "assistant", "content": ""}, **extra)
            async for piece in run.pieces():
                yield chunk(run, {"content": piece}, **extra)
            yield chunk(run, {}, run.finish_reason, cogvlm2=run.media_info(), **extra)
            if include_usage:
                data = {"id": run.handle.request_id, "object": "chat.completion.chunk", "created": int(time.time()),
                        "model": settings.model_name, "choices": [], "usage": run.usage()}
                yield f"data: {json.dumps(data)}\n\n"
            yield "data: [DONE]\n\n"
            finished = True
            record(run, 200)
        except CogVLM2Error as err:       # failed after the first token (rare): tell the client in-stream
            record(run, 400, "invalid_request_error")
            yield f"data: {json.dumps(_error_body(' '.join(str(err).split()), 'invalid_request_error'))}\n\n"
        except Exception as err:  # pylint: disable=broad-except
            error_id = uuid.uuid4().hex[:12]
            logger.error("internal error %s in a stream: %r", error_id, err, exc_info=err)
            record(run, 500, "server_error")
            yield f"data: {json.dumps(_error_body(f'internal server error (id {error_id})', 'server_error'))}\n\n"
        finally:                          # also when the client went away (the generator is closed)
            state["inflight"] -= 1
            if not finished and not run.handle.done():
                logger.info("%s: client gone, cancelling", run.handle.request_id)
                run.handle.cancel()
            _release_when_done(run.handle, media)

    def record(run: _Run, status: int, kind: str = None):
        metrics.count(status, kind)
        if status == 200:
            if run.first_token is not None:
                metrics.ttft.observe(run.first_token - run.received)
            metrics.latency.observe(time.perf_counter() - run.received)

    async def complete(run: _Run, body: ChatCompletionRequest, request: Request) -> dict:
        async def collect():
            return "".join([piece async for piece in run.pieces()])
        task = asyncio.ensure_future(collect())
        while not task.done():            # a client that hangs up cancels its sequence
            await asyncio.wait({task}, timeout=0.5)
            if not task.done() and await request.is_disconnected():
                run.handle.cancel()
        try:
            text = task.result()
        except CogVLM2Error as err:
            raise APIError(400, " ".join(str(err).split()), "invalid_request_error") from None
        except Exception as err:  # pylint: disable=broad-except
            raise internal(err) from None
        record(run, 200)
        return {"id": run.handle.request_id, "object": "chat.completion", "created": int(time.time()),
                "model": settings.model_name,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                             "logprobs": None, "finish_reason": run.finish_reason}],
                "usage": run.usage(), "cogvlm2": run.media_info()}

    return app
