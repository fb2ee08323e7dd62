"""CogVLM2Engine: many requests served from one loaded model, with continuous batching.

    engine = CogVLM2Engine.from_pretrained("tests/fixtures/tiny_chat")        # or .from_config(YAML)
    handle = engine.submit("Describe this video.", video="clip.mp4", max_new_tokens=64)
    for piece in handle:              # text as tokens arrive (whole UTF-8 characters)
        print(piece, end="")
    output = handle.result()          # .new_tokens (ids, no prompt echo), .text, .finish_reason, ...

Threads:
- the caller's: ``submit`` validates the options and queues the request (safe from any thread);
- preprocessing workers (``prep_workers``): read and transform the frames, build the prompt ids,
  check the context length, so the model rarely waits for decord;
- one model thread, the only one that calls MindSpore graphs: each loop admits prepared requests
  (vision tower unless cached, prefill, first token) while the batch has room, then runs one decode
  step for every running sequence. A finished or cancelled sequence leaves at once.

The batch's KV cache (``cogvlm2_batch_cache``): on CPU a slot per running sequence, written in place by
the decode step; elsewhere the functional cache, left-padded and extended by the step graph. The step
graph has dynamic shapes, so it is compiled once for every batch, prompt and cache size; the slot
decode graphs and the vision graphs are static, one per padded batch size or frame chunk, all
compiled by ``warmup()``.

The vision-embedding cache (LRU, bounded in MB) is keyed by the file's content (or the frames'
bytes) and the frame selection, so follow-up turns and repeated videos skip decoding and the tower.
"""
import collections
import dataclasses
import hashlib
import itertools
import os
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Deque, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
from mindspore import Tensor

from cogvlm2.cogvlm2 import padded_rows
from cogvlm2.cogvlm2_batch_cache import decode_batch
from cogvlm2.cogvlm2_errors import CogVLM2ConfigError, CogVLM2InputError
from cogvlm2.cogvlm2_generation import (GenerationOptions, generation_defaults, new_token_budget, pick_next_tokens,
                                        stream_text)
from cogvlm2.cogvlm2_loading import build_from_pretrained, build_from_yaml
from cogvlm2.cogvlm2_lora import load_adapter
from cogvlm2.cogvlm2_kv_cache import SlotKVCache
from cogvlm2.cogvlm2_token_types import causal_bias
from cogvlm2.cogvlm2_video_io import check_media_path

__all__ = ["CogVLM2Engine", "RequestHandle", "RequestOutput", "EngineClosedError"]


class EngineClosedError(RuntimeError):
    """submit() after close()."""


@dataclasses.dataclass
class RequestOutput:
    """The finished answer of one request."""
    request_id: str
    new_tokens: List[int]                    # generated ids, no prompt echo; a stop id, if hit, is last
    text: str                                # the decoded answer (special tokens skipped)
    finish_reason: str                       # "stop", "length" or "cancelled"
    prompt_tokens: int
    frames: int                              # frames the model looked at (0: text only)
    frame_indices: Optional[List[int]]       # which frames of the video
    seconds: float                           # submit -> finish
    time_to_first_token: Optional[float]     # submit -> first token


class RequestHandle:
    """What ``submit`` returns: wait for the result, iterate over text pieces, or cancel."""

    def __init__(self, request_id: str, tokenizer, stop_ids, engine: "CogVLM2Engine"):
        self.request_id = request_id
        self._tokenizer = tokenizer
        self._stop_ids = frozenset(int(i) for i in stop_ids)
        self._engine = engine
        self._cond = threading.Condition()
        self._tokens: List[int] = []
        self._output: Optional[RequestOutput] = None
        self._error: Optional[BaseException] = None
        self.cancelled = False
        self.submitted = time.perf_counter()
        self.first_token_time: Optional[float] = None
        self.frames = 0
        self.frame_indices: Optional[List[int]] = None
        self.prompt_tokens = 0

    # ----- for the caller --------------------------------------------------------------------
    def result(self, timeout: Optional[float] = None) -> RequestOutput:
        """Wait for the answer; raises the request's error (a CogVLM2Error for bad input)."""
        with self._cond:
            if not self._cond.wait_for(lambda: self._output is not None or self._error is not None, timeout):
                raise TimeoutError(f"request {self.request_id} not finished after {timeout} s")
            if self._error is not None:
                raise self._error
            return self._output

    def done(self) -> bool:
        return self._output is not None or self._error is not None

    def tokens(self, timeout: Optional[float] = None) -> Iterator[int]:
        """The generated ids as they arrive (the stop id included)."""
        index = 0
        while True:
            with self._cond:
                if not self._cond.wait_for(lambda: len(self._tokens) > index or self.done(), timeout):
                    raise TimeoutError(f"request {self.request_id}: no token for {timeout} s")
                new = self._tokens[index:]
                finished = self.done() and len(self._tokens) == index + len(new)
                error = self._error
            for token in new:
                yield token
            index += len(new)
            if finished:
                if error is not None:
                    raise error
                return

    def __iter__(self) -> Iterator[str]:
        """Text pieces as tokens arrive, whole UTF-8 characters only, ending before a stop token."""
        return stream_text(self._tokenizer, self.tokens(), self._stop_ids)

    def cancel(self):
        """Stop generating: the sequence leaves the batch before the next decode step; ``result()``
        then returns what was generated with finish_reason "cancelled"."""
        with self._cond:
            if self.done():
                return
            self.cancelled = True
        self._engine._wake()

    # ----- for the engine --------------------------------------------------------------------
    def _push(self, token: int):
        with self._cond:
            if self.first_token_time is None:
                self.first_token_time = time.perf_counter()
            self._tokens.append(token)
            self._cond.notify_all()

    def _finish(self, reason: str):
        now = time.perf_counter()
        tokens = list(self._tokens)
        output = RequestOutput(
            request_id=self.request_id, new_tokens=tokens,
            text=self._tokenizer.decode(tokens, skip_special_tokens=True) if tokens else "",
            finish_reason=reason, prompt_tokens=self.prompt_tokens, frames=self.frames,
            frame_indices=self.frame_indices, seconds=now - self.submitted,
            time_to_first_token=None if self.first_token_time is None else self.first_token_time - self.submitted)
        with self._cond:
            self._output = output
            self._cond.notify_all()

    def _fail(self, error: BaseException):
        with self._cond:
            self._error = error
            self._cond.notify_all()


@dataclasses.dataclass
class _Request:
    handle: RequestHandle
    text: str
    video: object
    history: Sequence[Tuple[str, str]]
    options: GenerationOptions
    # filled by preprocessing
    inputs: Optional[Dict[str, np.ndarray]] = None
    pixel_values: Optional[np.ndarray] = None
    vision_key: Optional[tuple] = None
    vision_embeds: Optional[Tensor] = None
    max_new_tokens: int = 0


class _Sequence:
    """A running request: what the decode step needs of it."""

    def __init__(self, request: _Request, prompt_ids: np.ndarray, next_position: int, stop_ids):
        self.request = request
        self.handle = request.handle
        self.history = prompt_ids.astype(np.int64)[None]          # (1, n): ids for the repetition penalty
        self.next_position = next_position
        self.stop_ids = stop_ids
        self.generated = 0
        self.rng = np.random.default_rng(request.options.seed)
        self.last_token = 0

    def pick(self, logits: np.ndarray) -> int:
        """One token from this row's logits (1, vocab), with its own options and generator."""
        token = int(pick_next_tokens(logits, self.request.options, self.history, self.rng)[0])
        self.history = np.concatenate([self.history, [[token]]], 1)
        self.generated += 1
        self.last_token = token
        return token

    def finish_reason(self, token: int) -> Optional[str]:
        if token in self.stop_ids:
            return "stop"
        if self.generated >= self.request.max_new_tokens:
            return "length"
        return None


class VisionCache:
    """Bounded LRU of vision embeddings: key -> (rows (T*66, H) Tensor, frame indices)."""

    def __init__(self, max_mb: float):
        self.max_bytes = int(max_mb * 2 ** 20)
        self.bytes = 0
        self._entries: "collections.OrderedDict[tuple, Tuple[Tensor, Optional[List[int]], int]]" = \
            collections.OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def get(self, key):
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                self.misses += 1
                return None
            self._entries.move_to_end(key)
            self.hits += 1
            return entry[0], entry[1]

    def put(self, key, embeds: Tensor, frame_indices):
        size = int(np.prod(embeds.shape)) * embeds.itemsize
        if size > self.max_bytes:
            return
        with self._lock:
            if key in self._entries:
                return
            self._entries[key] = (embeds, frame_indices, size)
            self.bytes += size
            while self.bytes > self.max_bytes:
                _, (_, _, old) = self._entries.popitem(last=False)
                self.bytes -= old

    def __len__(self):
        return len(self._entries)


@dataclasses.dataclass
class EngineStats:
    """Counters for monitoring (the server's /metrics)."""
    submitted: int = 0
    finished: int = 0
    cancelled: int = 0
    failed: int = 0
    prompt_tokens: int = 0
    generated_tokens: int = 0
    decode_steps: int = 0
    decode_rows: int = 0          # sum of the batch size over decode steps (occupancy = rows / steps)
    running: int = 0
    waiting: int = 0
    input_wait_seconds: float = 0.0   # the model thread idle while requests were still being preprocessed


class CogVLM2Engine:
    """Serves requests from one loaded ``CogVLM2ForVideo`` with continuous batching."""

    def __init__(self, model, processor, max_batch_size: Optional[int] = None,
                 vision_cache_mb: Optional[float] = None, prep_workers: int = 2, **generation_options):
        config = model.config
        if not config.use_past:
            raise CogVLM2ConfigError("use_past: False (recompute without a KV cache) is for checking only; "
                                     "the engine needs use_past: True (use cogvlm2.generate to recompute)")
        self.model = model
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.max_batch_size = int(max_batch_size or config.max_batch_size)
        if self.max_batch_size < 1:
            raise CogVLM2ConfigError(f"max_batch_size must be >= 1, got {max_batch_size}")
        self.defaults = generation_defaults(config)        # the YAML's generation settings
        self.defaults.update(generation_options)
        GenerationOptions.from_kwargs(**self.defaults)      # fail now on a bad default
        self.vision_cache = VisionCache(config.vision_cache_mb if vision_cache_mb is None else vision_cache_mb)
        self.stats = EngineStats()
        self._ids = itertools.count()
        self._cond = threading.Condition()
        self._ready: Deque[_Request] = collections.deque()  # prepared, waiting for a batch slot
        self._jobs: Deque[Tuple[callable, Future]] = collections.deque()   # calls to run on the model thread
        self._preparing = 0
        self._live: set = set()                            # handles not finished yet
        self._running: List[_Sequence] = []
        self._batch = decode_batch(model, self.max_batch_size)   # the running rows' KV cache
        self._closing = False
        self._prep_closed = False                          # close() has shut the preprocessing pool down:
                                                           # the model thread ends once nothing is left
        self._prep = ThreadPoolExecutor(max_workers=prep_workers, thread_name_prefix="cogvlm2-prep")
        self._thread = threading.Thread(target=self._loop, name="cogvlm2-model", daemon=True)
        self._thread.start()

    # ----- construction ----------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path: str, prep_workers: int = 2, adapter: Optional[str] = None,
                        **config_overrides) -> "CogVLM2Engine":
        """An engine on a HF or converted checkpoint directory (sizes and template from its config.json);
        ``config_overrides`` are CogVLM2Config keys (max_batch_size, vision_cache_mb, ...). ``adapter``:
        a peft LoRA adapter directory, applied as LoRA layers (not merged)."""
        model, processor = build_from_pretrained(path, **config_overrides)
        if adapter:
            load_adapter(model, adapter)
        return cls(model, processor, prep_workers=prep_workers)

    @classmethod
    def from_config(cls, yaml_path: str, load_checkpoint: Optional[str] = None, prep_workers: int = 2,
                    random_weights: bool = False, adapter: Optional[str] = None, **overrides) -> "CogVLM2Engine":
        """An engine from a mindformers YAML; ``overrides`` are model_config keys; ``adapter``: a peft
        LoRA adapter directory, applied as LoRA layers (not merged)."""
        model, processor, _ = build_from_yaml(yaml_path, load_checkpoint, random_weights=random_weights,
                                              **overrides)
        if adapter:
            load_adapter(model, adapter)
        return cls(model, processor, prep_workers=prep_workers)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # ----- requests --------------------------------------------------------------------------
    def submit(self, text: str, video=None, image=None, history=None, request_id: Optional[str] = None,
               **generation_options) -> RequestHandle:
        """Queue one question about a video (path or uint8 frames (T, H, W, 3)), an image (path or
        (H, W, 3)) or no media, after ``history`` [(question, answer), ...]. Generation options
        (max_new_tokens, do_sample, temperature, top_k, top_p, repetition_penalty, seed,
        stop_token_ids) override the config's; a bad one raises GenerationOptionError here."""
        if not isinstance(text, str):
            raise CogVLM2InputError(f"text must be a str, got {type(text).__name__}")
        if video is not None and image is not None:
            raise CogVLM2InputError("give a video or an image, not both")
        options = GenerationOptions.from_kwargs(**{**self.defaults, **generation_options})
        media = _checked_media(video, image)
        stop_ids = options.stop_token_ids if options.stop_token_ids is not None else self.model.config.stop_token_ids
        handle = RequestHandle(request_id or f"req-{next(self._ids)}", self.tokenizer, stop_ids, self)
        request = _Request(handle, text, media, list(history or []), options)
        with self._cond:
            if self._closing:
                raise EngineClosedError("the engine is closed")
            self._preparing += 1
            self._live.add(handle)
            self.stats.submitted += 1
        try:
            self._prep.submit(self._prepare, request)
        except BaseException:       # e.g. Ctrl-C's KeyboardInterrupt: the request never reaches the pool
            with self._cond:
                self._preparing -= 1
                self._live.discard(handle)
            raise
        return handle

    def generate(self, requests: Sequence, **generation_options) -> List[RequestOutput]:
        """Submit every request (a str, or a dict of ``submit`` arguments) and wait for all; an error of
        one request is raised after all are done."""
        handles = []
        for request in requests:
            kwargs = {"text": request} if isinstance(request, str) else dict(request)
            handles.append(self.submit(**{**generation_options, **kwargs}))
        return [handle.result() for handle in handles]

    def warmup(self):
        """Compile every graph (vision, prefill/decode step, the several-sequence decode step when
        ``decode_matmul`` gives one, the slot decode steps for every padded batch size when
        ``kv_cache`` does), so the first requests are fast."""
        model = self.model

        def compile_graphs():
            size = model.config.image_size                           # every vision graph, once
            model.encode_video(np.zeros((sum(model.vision_graph_frames()), 3, size, size), np.float32))
            rows = 2                                                   # a decode step of two sequences
            model.run_step(np.zeros((rows, 1), np.int64), None, np.zeros((rows, 1), np.int64),
                           np.zeros((rows, 1), np.int64), causal_bias(np.ones((rows, 1), np.int64), 0),
                           model.empty_cache(rows), np.arange(rows))[0].asnumpy()
            if model.slot_step is not None:          # every padded batch size on a cache of the engine's shape
                cache = SlotKVCache(model.config, self.max_batch_size)
                for count in sorted({padded_rows(n, cache.slots) for n in range(1, cache.slots + 1)}):
                    model.run_slot_step(np.zeros((count, 1)), np.zeros((count, 1)), cache, np.arange(count),
                                        np.zeros(count)).asnumpy()
        self.call_on_model_thread(compile_graphs)
        self.submit("warm up", max_new_tokens=2).result()

    def call_on_model_thread(self, fn):
        """Run ``fn()`` on the model thread between steps; returns its result."""
        future: Future = Future()
        with self._cond:
            self._jobs.append((fn, future))
            self._cond.notify_all()
        return future.result()

    def close(self, timeout: Optional[float] = None):
        """Stop accepting requests, finish the ones in flight (at most ``timeout`` seconds, then
        cancel what is left) and stop the threads."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        self._prep.shutdown(wait=True)
        with self._cond:              # nothing is preparing now, whatever _preparing says (an exception
            self._prep_closed = True  # inside submit, e.g. Ctrl-C's, can leave it off by one)
            self._cond.notify_all()
        self._thread.join(timeout)
        if self._thread.is_alive():
            with self._cond:
                for sequence in self._running:
                    sequence.handle.cancelled = True
                for request in self._ready:
                    request.handle.cancelled = True
                self._cond.notify_all()
            self._thread.join()
        with self._cond:
            lost = list(self._live)   # submitted but never reached the model thread: nobody waits forever
        for handle in lost:
            self._finish(handle, "cancelled")

    @property
    def closed(self) -> bool:
        return self._closing

    def snapshot(self) -> EngineStats:
        with self._cond:
            stats = dataclasses.replace(self.stats)
            stats.running = len(self._running)
            stats.waiting = len(self._ready) + self._preparing
        return stats

    def cancel_all(self):
        """Cancel every request not finished yet (e.g. on Ctrl-C); their handles return at once."""
        with self._cond:
            handles = list(self._live)
        for handle in handles:
            handle.cancel()
        self._wake()

    def _wake(self):
        with self._cond:
            self._cond.notify_all()

    # ----- preprocessing (worker threads) ----------------------------------------------------
    def _prepare(self, request: _Request):
        try:
            if not request.handle.cancelled:
                self._prepare_inputs(request)
        except Exception as error:  # pylint: disable=broad-except  (the request fails, not the engine)
            with self._cond:
                self._preparing -= 1
            self._fail(request.handle, error)
            return
        with self._cond:
            self._preparing -= 1
            self._ready.append(request)
            self._cond.notify_all()

    def _prepare_inputs(self, request: _Request):
        processor, frames_count, frame_indices = self.processor, 0, None
        if request.video is not None:
            key = _media_key(request.video, processor)
            cached = self.vision_cache.get(key) if self.vision_cache.max_bytes else None
            if cached is not None:
                request.vision_embeds, frame_indices = cached
                frames_count = int(request.vision_embeds.shape[0]) // self.model.config.vision_tokens_per_frame
            else:
                if isinstance(request.video, str):
                    frames, indices = processor.load_video(request.video)
                    frame_indices = [int(i) for i in indices]
                else:
                    frames = request.video
                    frame_indices = list(range(len(frames)))
                request.pixel_values = processor.transform(frames)
                frames_count = len(frames)
            request.vision_key = key
        request.inputs = processor.build_inputs(request.text, frames_count, request.history)
        prompt_length = request.inputs["input_ids"].shape[1]
        request.max_new_tokens = new_token_budget(self.model.config, prompt_length, request.options)
        handle = request.handle
        handle.frames, handle.frame_indices, handle.prompt_tokens = frames_count, frame_indices, prompt_length

    # ----- the model thread ------------------------------------------------------------------
    def _loop(self):
        while True:
            with self._cond:
                starved = not (self._ready or self._running or self._jobs) and self._preparing > 0
                waited_from = time.perf_counter()
                self._cond.wait_for(lambda: self._ready or self._running or self._jobs or self._closing_done())
                if starved:
                    self.stats.input_wait_seconds += time.perf_counter() - waited_from
                if not (self._ready or self._running or self._jobs):
                    return                                   # closing, and nothing is left
                jobs = list(self._jobs)
                self._jobs.clear()
            for fn, future in jobs:
                try:
                    future.set_result(fn())
                except BaseException as error:  # pylint: disable=broad-except
                    future.set_exception(error)
            self._drop_cancelled()
            while len(self._running) < self.max_batch_size:
                with self._cond:
                    if not self._ready:
                        break
                    request = self._ready.popleft()
                self._admit(request)
            if self._running:
                self._decode_step()

    def _closing_done(self) -> bool:
        return self._prep_closed

    def _admit(self, request: _Request):
        """Vision tower (unless cached), prefill, first token; the sequence joins the batch."""
        handle = request.handle
        if handle.cancelled:
            self._finish(handle, "cancelled")
            return
        try:
            model = self.model
            if request.pixel_values is not None:
                request.vision_embeds = model.vision_rows(request.pixel_values, None)   # (T*66, H)
                if self.vision_cache.max_bytes:
                    self.vision_cache.put(request.vision_key, request.vision_embeds, handle.frame_indices)
            inputs = request.inputs
            ids, types, positions = inputs["input_ids"], inputs["token_type_ids"], inputs["position_ids"]
            length = ids.shape[1]
            logits, past = model.run_step(ids, request.vision_embeds, types, positions,
                                          causal_bias(np.ones((1, length), np.int64), 0),
                                          model.empty_cache(1), np.array([length - 1]))
            stop_ids = set(request.options.stop_token_ids if request.options.stop_token_ids is not None
                           else model.config.stop_token_ids)
            sequence = _Sequence(request, ids[0], int(positions.max()) + 1, stop_ids)
            token = sequence.pick(logits.asnumpy())
        except Exception as error:  # pylint: disable=broad-except
            self._fail(handle, error)
            return
        request.pixel_values = None
        with self._cond:
            self.stats.prompt_tokens += length
        self._emit(sequence, token)
        reason = sequence.finish_reason(token)
        if reason is not None:
            self._finish(handle, reason)
            return
        self._batch.join(past, length)
        self._running.append(sequence)

    def _decode_step(self):
        """One new token for every running sequence."""
        rows = self._running
        batch = len(rows)
        tokens = np.array([[s.last_token] for s in rows], dtype=np.int64)           # (B, 1)
        positions = np.array([[s.next_position] for s in rows], dtype=np.int64)     # (B, 1)
        try:
            logits = self._batch.step(tokens, positions)                             # (B, vocab)
        except Exception as error:  # pylint: disable=broad-except  (fail the batch, keep serving)
            for sequence in rows:
                self._fail(sequence.handle, error)
            self._running = []
            self._batch.reset()
            return
        with self._cond:
            self.stats.decode_steps += 1
            self.stats.decode_rows += batch
        keep = []
        for index, sequence in enumerate(rows):
            sequence.next_position += 1
            token = sequence.pick(logits[index:index + 1])
            self._emit(sequence, token)
            reason = sequence.finish_reason(token)
            if reason is None:
                keep.append(index)
            else:
                self._finish(sequence.handle, reason)
        if len(keep) < batch:
            self._keep_rows(keep)

    def _drop_cancelled(self):
        keep = [i for i, s in enumerate(self._running) if not s.handle.cancelled]
        if len(keep) < len(self._running):
            for sequence in self._running:
                if sequence.handle.cancelled:
                    self._finish(sequence.handle, "cancelled")
            self._keep_rows(keep)

    def _keep_rows(self, keep: List[int]):
        """Shrink the batch to the rows ``keep`` (indices into the running rows)."""
        self._running = [self._running[i] for i in keep]
        self._batch.keep(keep)

    def _emit(self, sequence: _Sequence, token: int):
        sequence.handle._push(token)
        with self._cond:
            self.stats.generated_tokens += 1

    def _finish(self, handle: RequestHandle, reason: str):
        handle._finish(reason)
        with self._cond:
            self._live.discard(handle)
            if reason == "cancelled":
                self.stats.cancelled += 1
            else:
                self.stats.finished += 1

    def _fail(self, handle: RequestHandle, error: BaseException):
        handle._fail(error)
        with self._cond:
            self._live.discard(handle)
            self.stats.failed += 1


def _checked_media(video, image):
    """A path as str, or frames as uint8 (T, H, W, 3); a clear error for anything else."""
    if video is None and image is None:
        return None
    media, kind = (video, "video") if video is not None else (image, "image")
    if isinstance(media, (str, os.PathLike)):
        return check_media_path(media)
    frames = np.asarray(media)
    if kind == "image":
        if frames.ndim != 3 or frames.shape[-1] != 3:
            raise CogVLM2InputError(f"an image array must be uint8 RGB of shape (H, W, 3), got {frames.shape}")
        frames = frames[None]
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8 or not frames.shape[0]:
        hint = " (one picture? pass it as image=)" if frames.ndim == 3 else ""
        raise CogVLM2InputError(f"a video array must be uint8 RGB frames of shape (T, H, W, 3), got "
                                f"{frames.dtype} {frames.shape}{hint}")
    return frames


def _media_key(media, processor) -> tuple:
    """The vision cache key: the media's content and the frame selection that reads it."""
    digest = hashlib.blake2b(digest_size=20)
    if isinstance(media, str):
        try:
            with open(media, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    digest.update(chunk)
        except OSError as err:
            raise CogVLM2InputError(f"cannot read {media!r}: {err.strerror or err}") from err
        source = ("file", os.path.splitext(media)[1].lower())
    else:
        digest.update(np.ascontiguousarray(media).data)
        source = ("frames", media.shape)
    return (digest.hexdigest(), source, processor.frame_strategy, processor.num_frames, processor.image_size,
            processor.base_max_seconds)
