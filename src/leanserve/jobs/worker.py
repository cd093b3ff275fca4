"""Runs stored work through the engine: batches line by line, async requests one by one.

A batch moves validating → in_progress → finalizing → completed, or cancelling →
cancelled, or failed when its input cannot be used at all. At most
`max_batch_concurrency` lines of all batches are in the engine at once, at the batch
priority class, so batch work fills the capacity live traffic leaves instead of putting
thousands of sequences in the waiting queue ahead of it. Async requests run the same way
at the standard class.

When a batch's input is validated it is also planned (`carbon_schedule`): with a carbon
forecast, its lines may be held back until a cleaner hour that still meets its completion
window. The planned start is stored with the batch, so a restart keeps to it.

The worker knows nothing of HTTP. It is given `answer(endpoint, body, service_class, stop)`,
which returns what the live endpoint would answer, `(status, JSON body)`, or None when the
request should be tried again later (engine overloaded or shutting down, or `stop` set).
Only a definite answer is committed; anything else stays pending and runs again, after a
restart if need be.
"""
from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import time
import uuid
from pathlib import Path
from typing import Awaitable, Callable, Iterable, Iterator, NamedTuple

from .. import jsonsafe
from . import JobsConfig
from .carbon_schedule import deadline_of, load_forecast, plan_batch
from .store import InputLine, JobStore

log = logging.getLogger("leanserve.jobs")

Answer = Callable[[str, bytes, str, asyncio.Event], Awaitable["tuple[int, dict] | None"]]

ASYNC_CLASS, BATCH_CLASS = "standard", "batch"  # service classes (engine.sequence.PRIORITY_CLASSES)

POLL_SECONDS = 1.0  # the worker looks for work at least this often
RETRY_SECONDS = 1.0  # before asking again for an answer that was "try later"
CHARS_PER_TOKEN = 4  # to estimate a prompt's tokens without tokenizing it
DEFAULT_OUTPUT_TOKENS = 256  # assumed for a line that sets no max_tokens


class EngineRates(NamedTuple):
    """What the server has measured so far; None where it has not run enough to say."""

    tokens_per_second: float | None = None
    joules_per_token: float | None = None
    pue: float = 1.0


def estimated_tokens(body: str) -> int:
    """A rough upper estimate of the tokens one request line costs: its prompt (by length)
    plus max_tokens for each of its n choices."""
    request = json.loads(body)
    if "input" in request and "messages" not in request:  # an embeddings line: no output tokens
        return len(json.dumps(request["input"], ensure_ascii=False)) // CHARS_PER_TOKEN + 1
    prompt = request.get("messages", request.get("prompt", ""))
    output = request.get("max_completion_tokens") or request.get("max_tokens") or DEFAULT_OUTPUT_TOKENS
    n = request.get("n") if isinstance(request.get("n"), int) and request["n"] > 0 else 1
    prompt_tokens = len(json.dumps(prompt, ensure_ascii=False)) // CHARS_PER_TOKEN + 1
    return prompt_tokens + n * (output if isinstance(output, int) and output > 0 else DEFAULT_OUTPUT_TOKENS)


def response_line(custom_id: str, status: int, body: dict) -> dict:
    """A line of a batch's output (status 200) or error file, in OpenAI's shape."""
    request_id = body.get("id") if status == 200 else None
    return {"id": f"batch_req_{uuid.uuid4().hex}", "custom_id": custom_id,
            "response": {"status_code": status, "request_id": request_id or f"req_{uuid.uuid4().hex}",
                         "body": body},
            "error": None}


EXPIRED_MESSAGE = "This request could not be executed before the completion window expired."


def error_line(custom_id: str | None, code: str, message: str) -> dict:
    """An error-file line for an input line that was never run."""
    return {"id": f"batch_req_{uuid.uuid4().hex}", "custom_id": custom_id, "response": None,
            "error": {"code": code, "message": message}}


class LineError(ValueError):
    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


def parse_input(path: Path, endpoint: str, model: str) -> Iterator[InputLine]:
    """Checks each line of a batch input file on its own: a bad line becomes an error line
    naming its number (and custom_id when it has one), and the other lines still run.
    A custom_id belongs to the first line that uses it."""
    first_use: dict[str, int] = {}
    with open(path, "rb") as f:
        for number, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            custom_id = None
            try:
                try:
                    request = jsonsafe.loads(raw)
                except ValueError as e:
                    raise LineError("invalid_json_line", f"not valid JSON ({e})") from None
                if not isinstance(request, dict):
                    raise LineError("invalid_json_line", "must be a JSON object")
                custom_id = request.get("custom_id")
                if not isinstance(custom_id, str) or not custom_id:
                    custom_id = None
                    raise LineError("invalid_custom_id", "needs a non-empty string 'custom_id'")
                if custom_id in first_use:
                    raise LineError("duplicate_custom_id",
                                    f"custom_id {custom_id!r} is already used on line {first_use[custom_id]}")
                first_use[custom_id] = number
                yield InputLine(number, custom_id, body=json.dumps(_check_request(request, endpoint, model)))
            except LineError as e:
                yield InputLine(number, custom_id, error=error_line(custom_id, e.code, f"Line {number}: {e}"))


def _count_tokens(lines: Iterable[InputLine], total: list[int]) -> Iterator[InputLine]:
    """Passes `lines` through, adding the estimated tokens of those to run to total[0]."""
    for x in lines:
        if x.body is not None:
            total[0] += estimated_tokens(x.body)
        yield x


def _check_request(request: dict, endpoint: str, model: str) -> dict:
    """What can be told wrong about a line before running it; returns its body."""
    if request.get("method") != "POST":
        raise LineError("invalid_method", f"'method' must be 'POST', not {request.get('method')!r}")
    if request.get("url") != endpoint:
        raise LineError("invalid_url", f"'url' is {request.get('url')!r}, but this batch's endpoint is {endpoint}")
    body = request.get("body")
    if not isinstance(body, dict):
        raise LineError("invalid_body", "'body' must be a JSON object")
    if isinstance(body.get("model"), str) and body["model"] != model:
        raise LineError("model_not_found", f"The model `{body['model']}` does not exist.")
    if body.get("stream") is True:
        raise LineError("invalid_body", "'stream' is not supported in a batch")
    return body


class JobWorker:
    def __init__(self, store: JobStore, answer: Answer, model: str, config: JobsConfig,
                 rates: Callable[[], EngineRates] = EngineRates):
        self.store = store
        self.answer = answer
        self.model = model
        self.config = config
        self.rates = rates  # called from a worker thread when a batch is planned
        self._wake = asyncio.Event()
        self._lines: dict[tuple[str, int], asyncio.Event] = {}  # (batch, line) in the engine -> its stop
        self._cursor: dict[str, int] = {}  # batch -> the last line handed out
        self._asyncs: set[str] = set()  # async requests in the engine
        self._tasks: set[asyncio.Task] = set()
        self._main: asyncio.Task | None = None

    async def start(self) -> None:
        await asyncio.to_thread(self.store.requeue_async)
        self._main = asyncio.create_task(self._run())

    async def stop(self) -> None:
        """Cancels everything in flight; what was not committed runs again at the next start."""
        tasks = [t for t in (self._main, *self._tasks) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def wake(self) -> None:
        """Look for work now (a batch was created or cancelled, an async request queued)."""
        self._wake.set()

    async def _run(self) -> None:
        while True:
            self._wake.clear()
            try:
                await self._start_async()  # standard before batch: the more urgent class first
                for batch in await asyncio.to_thread(self.store.active_batches):
                    await self._advance_alone(batch)
            except Exception:  # a full disk, say: log it and try again later rather than stop for good
                log.exception("job worker pass failed")
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wake.wait(), POLL_SECONDS)

    # -- batches ------------------------------------------------------------------------------

    async def _advance_alone(self, batch: dict) -> None:
        """`_advance`, where one batch's failure holds back no other batch. A batch that cannot
        be validated at all (a bug its input found) fails, rather than being tried every second."""
        try:
            await self._advance(batch)
        except Exception as e:
            log.exception("batch %s: %s step failed", batch["id"], batch["status"])
            if batch["status"] == "validating":
                await asyncio.to_thread(self.store.fail_batch, batch["id"], [
                    {"code": "validation_failed", "message": f"The input file could not be validated: {e!r}",
                     "param": "input_file_id"}])

    async def _advance(self, batch: dict) -> None:
        batch_id, status = batch["id"], batch["status"]
        if status in ("validating", "in_progress") and time.time() >= deadline_of(batch):
            await self._expire(batch_id)
        elif status == "validating":
            await self._validate(batch)
        elif status == "in_progress":
            await self._dispatch(batch)
        elif status == "finalizing":
            await self._close(batch_id)
        elif status == "cancelling":
            for (owner, _), stop in self._lines.items():
                if owner == batch_id:
                    stop.set()
            if not self._in_engine(batch_id):
                await self._close(batch_id)

    async def _validate(self, batch: dict) -> None:
        path = self.store.file_path(batch["input_file_id"])
        tokens = [0]
        lines = _count_tokens(parse_input(path, batch["endpoint"], self.model), tokens)
        try:
            await asyncio.to_thread(self.store.start_batch, batch["id"], lines,
                                    functools.partial(self._plan, batch, tokens))
        except OSError as e:
            await asyncio.to_thread(self.store.fail_batch, batch["id"], [
                {"code": "input_file_unreadable", "message": f"The input file cannot be read: {e.strerror}",
                 "param": "input_file_id"}])
        self.wake()  # dispatch its lines now, not at the next poll

    def _plan(self, batch: dict, tokens: list[int]) -> dict:
        """When the batch's `tokens[0]` tokens of work should start (see carbon_schedule).
        An unreadable forecast is logged and the batch starts at once."""
        forecast = None
        if self.config.carbon_forecast is not None:
            try:
                forecast = load_forecast(self.config.carbon_forecast)
            except (OSError, ValueError) as e:
                log.error("carbon forecast unusable, batch %s starts at once: %s", batch["id"], e)
        rates = self.rates()
        tps = rates.tokens_per_second or self.config.default_tokens_per_second
        jpt, source = ((rates.joules_per_token, "measured") if rates.joules_per_token
                       else (self.config.default_joules_per_token, "default"))
        return plan_batch(forecast, time.time(), deadline_of(batch), tokens[0], tps, jpt, source,
                          rates.pue).as_dict()

    async def _dispatch(self, batch: dict) -> None:
        batch_id = batch["id"]
        if (batch["scheduled_start_at"] or 0) > time.time():
            return  # deferred to a cleaner hour; the next poll after the start dispatches it
        free = self.config.max_batch_concurrency - len(self._lines)
        rows = await asyncio.to_thread(self.store.pending_lines, batch_id, self._cursor.get(batch_id, 0),
                                       free) if free > 0 else []
        for row in rows:
            if (batch_id, row["line"]) not in self._lines:
                self._lines[batch_id, row["line"]] = asyncio.Event()
                self._spawn(self._run_line(batch_id, batch["endpoint"], row))
        if rows:
            self._cursor[batch_id] = rows[-1]["line"]
        elif not self._in_engine(batch_id):
            if await asyncio.to_thread(self.store.pending_lines, batch_id):
                self._cursor[batch_id] = 0  # a line left uncommitted behind the cursor: hand it out again
            elif await asyncio.to_thread(self.store.finalize_batch, batch_id):
                await self._close(batch_id)

    async def _run_line(self, batch_id: str, endpoint: str, row: dict) -> None:
        key = (batch_id, row["line"])
        try:
            answer = await self._answer(endpoint, row["body"], BATCH_CLASS, self._lines[key])
            if answer is not None:
                status, body = answer
                await asyncio.to_thread(self.store.finish_line, batch_id, row["line"],
                                        response_line(row["custom_id"], status, body), status == 200)
        finally:
            del self._lines[key]
            self.wake()

    def _in_engine(self, batch_id: str) -> bool:
        return any(owner == batch_id for owner, _ in self._lines)

    async def _expire(self, batch_id: str) -> None:
        """A batch whose completion window ran out, as OpenAI's: its lines in the engine are
        stopped, every line not done goes to the error file as `batch_expired`, the finished
        ones keep their results, and the batch ends `expired` once none is generating."""
        for (owner, _), stop in self._lines.items():
            if owner == batch_id:
                stop.set()
        if self._in_engine(batch_id):
            return  # a stopped line wakes the worker when it leaves the engine
        await asyncio.to_thread(self.store.expire_lines, batch_id, functools.partial(
            error_line, code="batch_expired", message=EXPIRED_MESSAGE))
        output, errors = await asyncio.to_thread(self._write_results, batch_id)
        await asyncio.to_thread(self.store.close_batch, batch_id, output, errors, True)
        self._cursor.pop(batch_id, None)

    async def _close(self, batch_id: str) -> None:
        """Writes the output and error files of a finalizing or cancelling batch and ends it."""
        output, errors = await asyncio.to_thread(self._write_results, batch_id)
        await asyncio.to_thread(self.store.close_batch, batch_id, output, errors)
        self._cursor.pop(batch_id, None)

    def _write_results(self, batch_id: str) -> tuple[Path | None, Path | None]:
        """The output and error files' contents in temp files; None for one that would be empty."""
        paths = {True: self.store.new_temp_path(), False: self.store.new_temp_path()}
        with open(paths[True], "w") as out, open(paths[False], "w") as err:
            files = {True: out, False: err}
            for ok, result in self.store.results(batch_id):
                files[ok].write(result + "\n")
        for ok, path in list(paths.items()):
            if path.stat().st_size == 0:
                path.unlink()
                paths[ok] = None
        return paths[True], paths[False]

    # -- async requests -----------------------------------------------------------------------

    async def _start_async(self) -> None:
        free = self.config.max_async_concurrency - len(self._asyncs)
        if free > 0:
            for row in await asyncio.to_thread(self.store.claim_async, free):
                self._asyncs.add(row["id"])
                self._spawn(self._run_async(row))

    async def _run_async(self, row: dict) -> None:
        try:
            answer = await self._answer(row["endpoint"], row["body"], ASYNC_CLASS, asyncio.Event())
            if answer is not None:
                await asyncio.to_thread(self.store.finish_async, row["id"], *answer)
        finally:
            self._asyncs.discard(row["id"])
            self.wake()

    # -- shared -------------------------------------------------------------------------------

    async def _answer(self, endpoint: str, body: str, service_class: str, stop: asyncio.Event) -> tuple[int, dict] | None:
        """Asks until the answer is definite; None if `stop` is set first."""
        while not stop.is_set():
            answer = await self.answer(endpoint, body.encode(), service_class, stop)
            if answer is not None:
                return answer
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), RETRY_SECONDS)
        return None

    def _spawn(self, coro) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("job task failed", exc_info=task.exception())
