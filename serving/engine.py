"""One pipeline behind a request queue: micro-batches into `generate_batch` on its own thread.

`Engine.generate(request)` is an async generator of events (plain dicts, so they cross a Ray
boundary unchanged):

    {"type": "error", "status", "message", "param"}  a request the engine refuses (first event)
    {"type": "queued", "replica"}                     accepted; waiting for a batch
    {"type": "started"}                               its first row entered a batch
    {"type": "text", "choice", "text"}                a text delta of one choice
    {"type": "finish", "choice", "finish_reason", "tokens"}
    {"type": "usage", "prompt_tokens", "completion_tokens", "cached_tokens"}  last event

The batch thread takes the oldest waiting job and every waiting job whose `GenerationConfig`
is equal but for the seed (`generate_batch` takes one config for all rows, and a seed per
row: every row draws from its own random stream, so a seeded request gets the same answer
alone or batched), up to `max_batch_size` rows; under load (the last batch had company, or
more jobs wait) it waits up to `batch_wait_ms` for more, a lone request is never held back.
Vision and prefix caches are the pipeline's,
shared by every request. The event loop never runs inference; a request whose consumer goes
away (a client that disconnects) stops its rows through `generate_batch(should_stop=...)`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import os
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from runtime.generation import GenerationConfig
from runtime.images import ImageInput
from runtime.pipeline import FlamingoPipeline, Generation, TextStream
from runtime.prompts import check_text, count_media

from .protocol import APIError

log = logging.getLogger("serving.engine")

Event = dict[str, Any]
PipelineFactory = Callable[[], FlamingoPipeline]
Choices = list[list[int]]  # per output of a job, the response choices it feeds
DEFAULT_MAX_TOKENS = 20  # `flamingo-export run --max-new-tokens`'s default
# GenerationConfig field -> the API field a request sets it with (400s name the API field)
_API_NAMES = {"seed": "seed", "temperature": "temperature", "top_p": "top_p", "top_k": "top_k",
              "max_new_tokens": "max_tokens", "num_beams": "num_beams",
              "num_return_sequences": "n"}  # fmt: skip


# EngineSettings' accepted ranges (inclusive); `flamingo-export serve` checks its options by them
SETTING_LIMITS = {
    "max_batch_size": (1, 1024),
    "max_queue": (1, 1 << 20),
    "batch_wait_ms": (0, 60_000),
}


@dataclass(frozen=True)
class EngineSettings:
    """Queue and batching limits of one engine (one pipeline)."""

    max_batch_size: int = 16  # rows per generate_batch call
    max_queue: int = 64  # waiting rows; beyond: 429
    batch_wait_ms: float = 10.0  # longest wait for batch-mates under load

    def __post_init__(self) -> None:
        for name, (lo, hi) in SETTING_LIMITS.items():
            check_number(name, getattr(self, name), lo, hi, integer=name != "batch_wait_ms")


def check_number(name: str, value: object, lo: float, hi: float, integer: bool = False) -> None:
    """ValueError naming `name` unless `value` is a finite number (an int if `integer`) in
    [lo, hi]: NaN passes every comparison and inf overflows timeouts, so both are refused."""
    kind = int if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kind):
        raise ValueError(f"{name} must be {'an integer' if integer else 'a number'}, got {value!r}")
    if not math.isfinite(value) or not lo <= value <= hi:
        raise ValueError(f"{name} must be a finite number in [{lo:g}, {hi:g}], got {value!r}")


@dataclass
class SamplingParams:
    """What a request asks of the search (API semantics; see `Engine.plan`)."""

    max_tokens: int | None = None
    temperature: float | None = None  # None or 0: greedy
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    n: int = 1
    num_beams: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False


@dataclass
class GenerateRequest:
    """A prompt with `<image>` markers, its images (marker order; anything
    runtime.images.load_image reads), the search."""

    prompt: str
    images: list[ImageInput]
    params: SamplingParams = field(default_factory=SamplingParams)
    affinity_key: str = ""


class QueueFull(Exception):
    pass


class StopMatcher:
    """The first stop sequence in streamed text; holds back a tail that could start one."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = [s for s in stops if s]
        self.buffer = ""

    def push(self, text: str) -> tuple[str, bool]:
        """(text safe to emit, whether a stop sequence ended the output)."""
        self.buffer += text
        hits = [i for i in (self.buffer.find(s) for s in self.stops) if i >= 0]
        if hits:
            out, self.buffer = self.buffer[: min(hits)], ""
            return out, True
        keep = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(self.buffer)), keep, -1):
                if self.buffer.endswith(s[:k]):
                    keep = k
                    break
        out = self.buffer[: len(self.buffer) - keep]
        self.buffer = self.buffer[len(self.buffer) - keep :]
        return out, False

    def flush(self) -> str:
        out, self.buffer = self.buffer, ""
        return out


class _Output:
    """One returned sequence of a job, feeding one or more choices of the response."""

    def __init__(self, stream: TextStream, stops: Sequence[str], choices: list[int]) -> None:
        self.stream = stream
        self.stop = StopMatcher(stops)
        self.choices = choices
        self.tokens = 0
        self.last_token: int | None = None
        self.reason: str | None = None


class Job:
    """One row of a batch: a prompt, its config, its outputs; events go to `emit`."""

    def __init__(
        self,
        prompt: str,
        images: list[ImageInput],
        config: GenerationConfig,
        outputs: list[_Output],
        emit: Callable[[Event], None],
    ) -> None:
        self.prompt = prompt
        self.images = images
        self.config = config
        self.outputs = outputs
        self.emit = emit
        self.cancelled = threading.Event()
        # jobs batch when their settings but the seed agree: every row draws from its own seed
        self.key = dataclasses.replace(config, seed=None)

    def on_token(self, j: int, token: int) -> None:
        out = self.outputs[j]
        if out.reason is not None:
            return
        out.tokens += 1
        out.last_token = token
        text, hit = out.stop.push(out.stream.push(token))
        self._text(out, text)
        if hit:
            out.reason = "stop"

    def should_stop(self) -> bool:
        return self.cancelled.is_set() or all(o.reason is not None for o in self.outputs)

    def finish(self, generation: Generation) -> None:
        for out in self.outputs:
            if out.reason is None:
                text, hit = out.stop.push(out.stream.flush())
                if hit:
                    out.reason = "stop"
                else:
                    text += out.stop.flush()
                    eos = out.last_token in self.config.eos_token_ids
                    out.reason = "stop" if eos else "length"
                self._text(out, text)
            for c in out.choices:
                self.emit({"type": "finish", "choice": c, "finish_reason": out.reason,
                           "tokens": out.tokens})  # fmt: skip
        stats = generation.stats
        self.emit({"type": "job_done", "prompt_tokens": stats["prompt_tokens"],
                   "cached_tokens": stats["cached_tokens"]})  # fmt: skip

    def fail(self, status: int, message: str, param: str | None = None) -> None:
        self.emit({"type": "error", "status": status, "message": message, "param": param})

    def _text(self, out: _Output, text: str) -> None:
        if text:
            for c in out.choices:
                self.emit({"type": "text", "choice": c, "text": text})


class Engine:
    """A pipeline, its queue and its batch thread. `load()` blocks until the pipeline is built."""

    def __init__(self, factory: PipelineFactory, settings: EngineSettings | None = None) -> None:
        self.factory = factory
        self.settings = settings or EngineSettings()
        self.pipe: FlamingoPipeline | None = None
        self.load_error: str | None = None
        self.replica = f"local:{os.getpid()}"
        self._cond = threading.Condition()
        self._pending: deque[Job] = deque()
        self._closed = False
        self._thread: threading.Thread | None = None
        self.max_prompt_chars = 0  # set by load(): see plan()
        self.counters = {"generated_tokens": 0, "cancelled_jobs": 0, "batches": 0, "rows": 0}

    # ------------------------------------------------------------------ lifecycle

    @property
    def ready(self) -> bool:
        """Loaded, not closed, and the batch thread alive (a dead one would take no jobs)."""
        alive = self._thread is not None and self._thread.is_alive()
        return self.pipe is not None and not self._closed and alive

    def load(self) -> None:
        """Build the pipeline (engines loaded) and start the batch thread; errors are kept in
        `load_error` and re-raised."""
        try:
            pipe = self.factory()
        except Exception as e:
            self.load_error = f"{type(e).__name__}: {e}"
            raise
        # A prompt of n tokens has at most n * (longest vocabulary entry) characters: one
        # token never covers more text than its vocabulary string (byte-level BPE: a byte per
        # character; SentencePiece: "▁" for " "), so a longer prompt exceeds the context
        # and is refused before the tokenizer spends time on it.
        longest = max((len(t) for t in pipe.tokenizer.get_vocab()), default=1)
        self.max_prompt_chars = pipe.max_seq_len * max(longest, 1)
        self.pipe = pipe
        self._thread = threading.Thread(target=self._loop, name="flamingo-batches", daemon=True)
        self._thread.start()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            for job in self._pending:
                job.cancelled.set()
            self._pending.clear()
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=30)

    def queue_depth(self) -> int:
        return len(self._pending)

    def stats(self) -> dict[str, Any]:
        """Counters of this engine (generated tokens, cancelled jobs, batches, rows) and the
        pipeline's cache statistics."""
        caches = self.pipe.cache_stats() if self.pipe is not None else {}
        return {**self.counters, "queue_depth": self.queue_depth(), "caches": caches}

    # ------------------------------------------------------------------ requests

    def plan(self, request: GenerateRequest) -> tuple[list[GenerationConfig], list[Choices]]:
        """Check a request against the export's limits and turn its API parameters into
        configs: per job, its config and its outputs' choice indices. 400s name the request's
        logical field (prompt, images, max_tokens, n, ...)."""
        pipe = self.pipe
        assert pipe is not None
        p = request.params
        if len(request.prompt) > self.max_prompt_chars:
            raise APIError(
                400,
                f"the prompt has {len(request.prompt)} characters, more than this export's "
                f"context of {pipe.max_seq_len} tokens can hold ({self.max_prompt_chars})",
                param="prompt",
            )
        try:  # the chat path checks its texts the same way (runtime.prompts)
            check_text(request.prompt, "the prompt")
        except ValueError as e:
            raise APIError(400, str(e), param="prompt") from None
        if not request.prompt.strip():
            raise APIError(400, "the prompt is empty", param="prompt")
        markers = count_media(request.prompt)
        if markers != len(request.images):
            raise APIError(
                400,
                f"the prompt has {markers} <image> marker(s) but {len(request.images)} image(s) "
                "were given",
                param="images",
            )
        if len(request.images) > pipe.max_images:
            raise APIError(
                400,
                f"{len(request.images)} images exceed this export's limit of {pipe.max_images}",
                param="images",
            )
        n_tokens = len(pipe.tokenizer.encode(request.prompt).ids)
        max_new = p.max_tokens or DEFAULT_MAX_TOKENS
        if n_tokens >= pipe.max_seq_len:
            raise APIError(
                400,
                f"the prompt has {n_tokens} tokens; this export's context is {pipe.max_seq_len}",
                param="prompt",
            )
        if n_tokens + max_new > pipe.max_seq_len:
            raise APIError(
                400,
                f"prompt of {n_tokens} tokens + max_tokens {max_new} exceeds this export's "
                f"context of {pipe.max_seq_len}; ask for at most {pipe.max_seq_len - n_tokens}",
                param="max_tokens",
            )
        kw: dict[str, Any] = {"max_new_tokens": max_new}
        sampled = bool(p.temperature)
        if sampled:
            kw.update(do_sample=True, temperature=p.temperature, seed=p.seed)
            if p.top_p is not None:
                kw["top_p"] = p.top_p
            if p.top_k is not None:
                kw["top_k"] = p.top_k
        beams = p.num_beams or 1
        if beams > 1:
            if p.n > beams:
                raise APIError(400, f"n ({p.n}) must be <= num_beams ({beams})", param="n")
            kw.update(num_beams=beams, num_return_sequences=p.n)
        if p.ignore_eos:
            kw["eos_token_ids"] = ()
        try:
            base = pipe.default_config(**kw)
            base.validate()
        except ValueError as e:  # GenerationConfig's messages start with its field's name
            field_name = (str(e).split() or [""])[0]
            raise APIError(400, str(e), param=_API_NAMES.get(field_name)) from None
        if beams > 1:  # one job, its n best beams
            return [base], [[[j] for j in range(p.n)]]
        if sampled and p.n > 1:  # n rows; seeded: seed, seed + 1, ...
            configs = [
                pipe.default_config(**{**kw, "seed": None if p.seed is None else p.seed + i})
                for i in range(p.n)
            ]
            return configs, [[[i]] for i in range(p.n)]
        return [base], [[list(range(p.n))]]  # greedy: one row, the same answer n times

    async def generate(self, request: GenerateRequest) -> AsyncIterator[Event]:
        """The request's events (module docstring); closing the generator cancels its rows."""
        if self.pipe is None:
            yield _error(503, self.load_error or "the model is still loading")
            return
        try:  # tokenizing a long prompt takes a while: never on the event loop
            configs, choices = await asyncio.to_thread(self.plan, request)
        except APIError as e:
            yield _error(e.status, e.message, e.param)
            return
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Event] = asyncio.Queue()

        def emit(event: Event) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, event)

        pipe = self.pipe
        jobs = []
        for config, job_choices in zip(configs, choices):
            skip = config.eos_token_ids
            outputs = [_Output(TextStream(pipe.tokenizer, skip), request.params.stop, c)
                       for c in job_choices]  # fmt: skip
            jobs.append(Job(request.prompt, request.images, config, outputs, emit))
        try:
            self._submit(jobs)
        except QueueFull:
            yield _error(429, f"the queue is full ({self.settings.max_queue} waiting); retry later")
            return
        yield {"type": "queued", "replica": self.replica}
        done = 0
        started = False
        prompt_tokens = cached_tokens = completion = 0
        try:
            while done < len(jobs):
                event = await queue.get()
                kind = event["type"]
                if kind == "job_done":
                    done += 1
                    if done == 1:
                        prompt_tokens = event["prompt_tokens"]
                        cached_tokens = event["cached_tokens"]
                    continue
                if kind == "started":
                    if not started:
                        started = True
                        yield event
                    continue
                if kind == "finish":
                    completion += event["tokens"]
                yield event
                if kind == "error":
                    return
            yield {"type": "usage", "prompt_tokens": prompt_tokens,
                   "completion_tokens": completion, "cached_tokens": cached_tokens}  # fmt: skip
        finally:
            for job in jobs:
                job.cancelled.set()

    # ------------------------------------------------------------------ batch thread

    def _submit(self, jobs: list[Job]) -> None:
        with self._cond:
            if self._closed:
                raise QueueFull
            if len(self._pending) + len(jobs) > self.settings.max_queue:
                raise QueueFull
            self._pending.extend(jobs)
            self._cond.notify()

    def _loop(self) -> None:
        last_rows = 0
        try:
            while True:
                # The batch lives only in this statement: while the thread waits for the next
                # job, no finished job (its prompt, its decoded images) stays referenced.
                last_rows = self._run(self._next_batch(last_rows))
        except _Closed:
            return
        except BaseException as e:  # a dead batch thread: /health turns 503, requests fail
            log.exception("the batch thread stopped")
            self.load_error = f"the batch thread stopped ({type(e).__name__}); restart the server"
            with self._cond:
                self._closed = True
                for job in self._pending:
                    job.fail(503, self.load_error)
                self._pending.clear()

    def _next_batch(self, last_rows: int) -> list[Job]:
        """The next batch (module docstring); raises _Closed once the engine is closed."""
        wait_s = self.settings.batch_wait_ms / 1e3
        with self._cond:
            while True:
                while not self._pending and not self._closed:
                    self._cond.wait()
                if self._closed:
                    raise _Closed
                first = self._pending.popleft()
                if not first.cancelled.is_set():
                    break
                self.counters["cancelled_jobs"] += 1
            batch = [first]
            busy = last_rows > 1 or bool(self._pending)
            deadline = time.monotonic() + (wait_s if busy else 0.0)
            while len(batch) < self.settings.max_batch_size:
                self._take_matching(first.key, batch)
                left = deadline - time.monotonic()
                if len(batch) >= self.settings.max_batch_size or left <= 0:
                    break
                self._cond.wait(left)
            return batch

    def _take_matching(self, key: GenerationConfig, batch: list[Job]) -> None:
        keep: deque[Job] = deque()
        while self._pending:
            job = self._pending.popleft()
            room = len(batch) < self.settings.max_batch_size
            if room and job.key == key and not job.cancelled.is_set():
                batch.append(job)
            else:
                keep.append(job)
        self._pending = keep

    def _run(self, batch: list[Job]) -> int:
        """Generate one batch, its events to its jobs; returns its number of rows."""
        pipe = self.pipe
        assert pipe is not None
        config = batch[0].key
        seeds = [job.config.seed for job in batch] if config.do_sample else None
        n_ret = config.num_return_sequences if config.num_beams > 1 else 1
        emitted = False

        def on_token(row: int, token: int) -> None:
            nonlocal emitted
            emitted = True
            self.counters["generated_tokens"] += 1
            b, j = divmod(row, n_ret)
            batch[b].on_token(j, token)

        def should_stop(b: int) -> bool:
            return batch[b].should_stop()

        for job in batch:
            job.emit({"type": "started"})
        self.counters["batches"] += 1
        self.counters["rows"] += len(batch)
        try:
            generations = pipe.generate_batch(
                [j.prompt for j in batch], [j.images for j in batch], config, on_token,
                should_stop, seeds=seeds,
            )  # fmt: skip
        except ValueError as e:  # a row the pipeline refuses (ImageError is one)
            if len(batch) > 1 and not emitted:
                for job in batch:  # find it; the others still get their answers
                    self._run([job])
                return len(batch)
            for job in batch:
                job.fail(400, str(e))
            return len(batch)
        except Exception:  # the details go to the log, not to the client
            log.exception("generate_batch failed")
            for job in batch:
                job.fail(500, "internal error while generating (details in the server log)")
            return len(batch)
        for job, generation in zip(batch, generations[::n_ret]):  # n_ret per prompt
            if job.cancelled.is_set():
                self.counters["cancelled_jobs"] += 1
            job.finish(generation)
        return len(batch)


class _Closed(Exception):
    pass


def _error(status: int, message: str, param: str | None = None) -> Event:
    return {"type": "error", "status": status, "message": message, "param": param}
