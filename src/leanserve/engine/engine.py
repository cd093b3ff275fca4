"""The engine: one model, many sequences, one forward pass per step.

`LLMEngine` is synchronous (add requests, call `step()`); `AsyncEngine` runs its step loop
in a background thread and streams each request's deltas to an asyncio consumer. Torch
releases the GIL inside its kernels, so the event loop keeps serving HTTP while a step runs.
"""
from __future__ import annotations

import asyncio
import ctypes
import gc
import itertools
import logging
import queue
import threading
import time
from typing import AsyncIterator

import torch

from ..config import DEFAULT_MAX_MODEL_LEN, EngineConfig
from ..energy.config import make_ledger
from ..energy.ledger import Work, work_from_batch
from ..errors import InvalidRequest, ModelLoadError, Overloaded
from ..models.llama import KVPool, build_model
from ..models.loader import load_model_files
from ..models.quant import CALIBRATION_TEXT, pack_model, quantize_model, smooth_for_w8a8
from .detokenizer import IncrementalDetokenizer
from .kv_cache import BlockManager, num_blocks_for_budget
from .lora import LoRAManager
from .runner import ModelRunner
from .sampling import Sampler
from .scheduler import Scheduler
from .sequence import RequestError, RequestOutput, SamplingParams, Sequence
from .structured import GrammarCompiler, MaskBatch, forced_tokens

log = logging.getLogger("leanserve.engine")

DTYPES = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16,
          "fp16": torch.float16, "float32": torch.float32, "fp32": torch.float32}


class LLMEngine:
    def __init__(self, config: EngineConfig):
        if config.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {config.dtype!r}")
        if config.kv_cache_dtype not in ("auto", "int8"):
            raise ValueError(f"kv_cache_dtype must be 'auto' or 'int8', got {config.kv_cache_dtype!r}")
        if config.num_threads:
            torch.set_num_threads(config.num_threads)
        self.config = config
        self.built_on = threading.get_ident()  # the thread that ran the loading kernels
        started = time.perf_counter()
        files = load_model_files(config.model)
        self.model_name = files.name
        self.tokenizer = files.tokenizer
        self.eos_ids = set(files.tokenizer.eos_token_ids)
        self.dtype = dtype = DTYPES[config.dtype]
        self.kv_dtype = torch.int8 if config.kv_cache_dtype == "int8" else dtype
        context = files.config.get("max_position_embeddings") or DEFAULT_MAX_MODEL_LEN
        self._max_len = max_len = config.max_model_len or min(context, DEFAULT_MAX_MODEL_LEN)
        self.model = self._build_model(files)
        del files
        self.args = args = self.model.args
        num_blocks = config.num_kv_blocks or num_blocks_for_budget(
            config.kv_cache_gib, args.num_layers, args.num_kv_heads, args.head_dim, config.block_size, self.kv_dtype)
        # A sequence can never outgrow the pool: the pool bounds the context too (as in vLLM).
        self.max_model_len = min(max_len, num_blocks * config.block_size)
        self.kv = BlockManager(num_blocks, config.block_size, config.prefix_caching)
        self.pool = KVPool(args, num_blocks, config.block_size, self.kv_dtype)
        self.scheduler = Scheduler(config, self.kv)
        self.runner = ModelRunner(self.model, self.pool, config.block_size)
        self.lora = LoRAManager(args, config.lora, [self.model_name, config.model], dtype)
        self.lora.smoothing = self.smoothing
        self.runner.lora = self.scheduler.lora = self.lora
        self.sampler = Sampler(config.seed)
        self.grammars = GrammarCompiler(self.tokenizer, args.vocab_size)
        self.masks = MaskBatch(args.vocab_size, self.eos_ids)
        self.forced_tokens = 0  # structured-output tokens appended without sampling (fast-forward)
        self.constrained_tokens = 0  # structured-output tokens, sampled or forced
        self.ledger = make_ledger(config.energy, args)
        self.seqs: dict[str, Sequence] = {}
        self.detoks: dict[str, IncrementalDetokenizer] = {}
        self._ids = itertools.count()
        self._done_early: list[RequestOutput] = []
        self.tokens_run = 0  # prompt and output tokens through the model, over all steps
        self.load_seconds = [time.perf_counter() - started]  # each load of the weights, the first one too
        self.num_unloads = 0

    # -- weights in memory or not (scale to zero) ---------------------------------------------

    def _build_model(self, files):
        """The model of `files`, quantized if asked. Drops `files.weights` (copied into the
        model) first, so the two are not in memory together longer than needed."""
        model = build_model(files.config, files.weights, self.dtype, self._max_len)
        files.weights = {}
        self.smoothing = {}  # LoRA adapters over smoothed W8A8 projections need the factors
        if self.config.quantization == "w8a8" and self.config.w8a8_smoothing:
            self.smoothing = smooth_for_w8a8(model, self.tokenizer.encode(CALIBRATION_TEXT))
        if self.config.quantization:
            quantize_model(model, self.config.quantization)
        else:
            pack_model(model)
        return model

    @property
    def loaded(self) -> bool:
        return self.model is not None

    def unload(self) -> None:
        """Frees the weights, the KV pool and the LoRA slots; the next `step()` with work loads
        them again (adapters stay registered and are read from their files at their next use).
        Tokenizer, scheduler, counters and the energy ledger stay."""
        if self.seqs or self._done_early:
            raise RuntimeError("cannot unload while requests are in the engine")
        self.lora.release_slots()
        self.model = self.pool = self.runner = None
        self.kv.forget_contents()  # the prefix cache named blocks of the pool just freed
        self.num_unloads += 1
        release_memory()

    def load(self) -> None:
        """Reads the model files again and rebuilds the model, KV pool and runner."""
        if self.loaded:
            return
        started = time.perf_counter()
        files = load_model_files(self.config.model)
        model = self._build_model(files)
        del files
        self.pool = KVPool(model.args, self.kv.num_blocks, self.config.block_size, self.kv_dtype)
        self.runner = ModelRunner(model, self.pool, self.config.block_size)
        self.runner.lora = self.lora
        self.lora.smoothing = self.smoothing  # the new model's (the slots went with the old one)
        self.model = model
        self.load_seconds.append(time.perf_counter() - started)

    # -- requests -------------------------------------------------------------------------

    def make_sequence(self, request_id: str, prompt: str | list[int], params: SamplingParams,
                      priority: int = 0, adapter: str | None = None, client: str | None = None,
                      max_tokens_cap: int | None = None) -> Sequence:
        """Validates a request and tokenizes it. Pure: safe to call from any thread.
        `adapter`: the name of a registered LoRA adapter, or None for the base model.
        `max_tokens_cap`: how far a request that sets no max_tokens may generate (the server's
        default); without it, up to the context."""
        lora = self.lora.get(adapter) if adapter else None
        params.validate()
        if params.top_k > self.args.vocab_size:
            raise InvalidRequest(f"top_k must be -1, 0 (off) or at most the vocabulary size {self.args.vocab_size}, "
                                 f"got {params.top_k}", "top_k")
        if isinstance(prompt, str):
            ids = self.tokenizer.encode(prompt) if prompt else []
        else:
            ids = list(prompt)
            if any(not isinstance(t, int) or not 0 <= t < self.args.vocab_size for t in ids):
                raise InvalidRequest(f"prompt token ids must be integers in [0, {self.args.vocab_size})", "prompt")
        if not ids:
            raise InvalidRequest("prompt is empty", "prompt")
        room = self.max_model_len - len(ids)
        if room < 0 or (room == 0 and params.max_tokens != 0):
            raise InvalidRequest(f"prompt has {len(ids)} tokens; this model's context is {self.max_model_len}", "prompt")
        if params.max_tokens is not None and params.max_tokens > room:
            raise InvalidRequest(f"prompt ({len(ids)} tokens) plus max_tokens ({params.max_tokens}) exceeds the "
                                 f"context of {self.max_model_len} tokens", "max_tokens")
        if params.max_tokens is not None:
            max_tokens = params.max_tokens
        else:
            max_tokens = room if max_tokens_cap is None else min(room, max_tokens_cap)
            if params.min_tokens > max_tokens:
                bound = f"the server's default of {max_tokens_cap}" if max_tokens == max_tokens_cap \
                    else f"the {room} tokens left in the context"
                raise InvalidRequest(f"min_tokens ({params.min_tokens}) must not exceed max_tokens; this request sets "
                                     f"none, so it is {bound}", "min_tokens")
        seq = Sequence(next(self._ids), request_id, ids, params, max_tokens, priority, lora, client)
        if params.constraint is not None:  # compiled already by the server (off the loop), else here
            seq.matcher = self.grammars.matcher(params.constraint)
        return seq

    def add_sequence(self, seq: Sequence) -> None:
        if seq.request_id in self.seqs:
            raise InvalidRequest(f"request id {seq.request_id!r} is already running")
        if seq.max_tokens == 0:
            self._done_early.append(self._output(seq, "", [], None, finish="length"))
            return
        self.seqs[seq.request_id] = seq
        self.detoks[seq.request_id] = IncrementalDetokenizer(self.tokenizer, seq.token_ids, seq.params.stop)
        self.scheduler.add(seq)

    def add_request(self, request_id: str, prompt: str | list[int], params: SamplingParams | None = None,
                    priority: int = 0, adapter: str | None = None) -> Sequence:
        seq = self.make_sequence(request_id, prompt, params or SamplingParams(), priority, adapter)
        self.add_sequence(seq)
        return seq

    def abort(self, request_id: str) -> RequestOutput | None:
        seq = self.seqs.get(request_id)
        if seq is None:
            return None
        out = self._finish(seq, "", [], None, "abort")
        out.bill = self.ledger.close(request_id)
        return out

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work() or bool(self._done_early)

    @property
    def num_waiting(self) -> int:
        return len(self.scheduler.waiting)

    # -- the step ---------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        outputs, self._done_early = self._done_early, []
        batch = self.scheduler.schedule()
        for seq in self.scheduler.failed:  # their adapter's file could not be read (it changed since registration)
            outputs.append(self._fail(seq, RequestError(
                400, f"adapter {seq.adapter.name!r} could not be loaded: {seq.adapter.error}", "invalid_adapter",
                "model")))
        self.scheduler.failed = []
        if batch:
            self.load()  # after an unload; a no-op when loaded
            self.tokens_run += sum(n for _, n in batch)
            with self.ledger.step(work_from_batch(batch)):
                outputs += self._run(batch)
        for out in outputs:
            if out.finished:
                out.bill = self.ledger.close(out.request_id)
        return outputs

    def _run(self, batch: list[tuple[Sequence, int]]) -> list[RequestOutput]:
        """One step. What fails for one sequence (its sampling, its detokenizing) ends that
        sequence alone with a 500 and the others go on; see `_forward` for the pass itself."""
        now = time.perf_counter()
        for seq, _ in batch:
            if seq.metrics.first_scheduled is None:
                seq.metrics.first_scheduled = now
        # the constrained rows' token masks are computed while the forward pass runs
        self.masks.start([seq for seq, n in batch if seq.num_computed + n == len(seq)])
        try:
            batch, (out, to_sample, argmax), outputs = self._forward(batch)
        finally:
            allowed = self.masks.result()
        for seq, n in batch:
            seq.num_computed += n
            self.kv.register_full_blocks(seq)
        if not to_sample:
            return outputs
        if argmax:  # the model gave the tokens: greedy rows, nothing to apply to the logits
            tokens, logprobs, errors = out.tolist(), [None] * len(to_sample), [None] * len(to_sample)
        else:
            tokens, logprobs, errors = self.sampler.sample(out, to_sample, self.eos_ids, allowed)
        now = time.perf_counter()
        for seq, token, lp, error in zip(to_sample, tokens, logprobs, errors):
            if seq.metrics.first_token is None:
                seq.metrics.first_token = now
            if error is None:
                try:
                    outputs.append(self._append(seq, token, lp))
                    continue
                except Exception as e:
                    log.exception("detokenizing %s failed", seq.request_id)
                    error = f"detokenizing its output failed: {e!r}"
            else:
                error = f"sampling its next token failed: {error!r}"
            outputs.append(self._fail(seq, RequestError(500, f"The engine could not continue this request: {error}",
                                                        "engine_error")))
        return outputs

    def _forward(self, batch: list[tuple[Sequence, int]]):
        """Runs the model over `batch`. If the pass fails, it is run once more without the
        newest sequence (the likeliest cause: the others ran in earlier steps), which then
        ends with a 500. Returns the batch that ran, the runner's result, and that output."""
        def greedy(seqs):
            return self.sampler.argmax_only(seqs, self.eos_ids)

        try:
            return batch, self.runner.execute(batch, greedy), []
        except Exception as e:
            if len(batch) == 1:
                raise
            log.exception("the forward pass failed; running the step again without its newest sequence")
            newest = max((seq for seq, _ in batch), key=lambda s: s.seq_id)
            error = e
        rest = [(seq, n) for seq, n in batch if seq is not newest]
        result = self.runner.execute(rest, greedy)  # a second failure fails the step for all
        return rest, result, [self._fail(newest, RequestError(
            500, f"The engine could not run this request: {error!r}", "engine_error"))]

    def _fail(self, seq: Sequence, error: RequestError) -> RequestOutput:
        out = self._finish(seq, "", [], None, "abort")
        out.error = error
        return out

    def _append(self, seq: Sequence, token: int, lp) -> RequestOutput:
        """Appends the sampled token, then (structured outputs without logprobs) the tokens
        its grammar forces next, each checked for a stop like a sampled one."""
        tokens, text = [token], ""
        if seq.matcher is not None:
            seq.matcher.consume_token(token)
            if seq.params.logprobs is None:
                tokens += forced_tokens(seq.matcher)[:max(0, seq.max_tokens - seq.num_output - 1)]
                seq.matcher.consume_tokens(tokens[1:])
                self.forced_tokens += len(tokens) - 1
            self.constrained_tokens += len(tokens)
        p = seq.params
        detok = self.detoks[seq.request_id]
        for i, token in enumerate(tokens):
            seq.token_ids.append(token)
            done = tokens[:i + 1]
            may_stop = seq.num_output >= p.min_tokens
            if may_stop and token in p.stop_token_ids:
                return self._finish(seq, text + detok.flush(), done, lp, "stop", stop_reason=token)
            if may_stop and token in self.eos_ids and not p.ignore_eos:
                return self._finish(seq, text + detok.flush(), done, lp, "stop")
            piece, stop = detok.add(token)
            text += piece
            if may_stop and stop is not None:
                return self._finish(seq, text, done, lp, "stop", stop_reason=stop)
            if seq.num_output >= seq.max_tokens or len(seq) >= self.max_model_len:
                return self._finish(seq, text + detok.flush(), done, lp, "length")
        if seq.matcher is not None and seq.matcher.is_stopped():  # complete: nothing but EOS may follow
            return self._finish(seq, text + detok.flush(), tokens, lp, "stop")
        return self._output(seq, text, tokens, lp)

    def _finish(self, seq: Sequence, text, tokens, lp, finish: str, stop_reason=None) -> RequestOutput:
        self.scheduler.remove(seq)
        self.sampler.forget(seq)
        self.seqs.pop(seq.request_id, None)
        self.detoks.pop(seq.request_id, None)
        seq.stop_reason = stop_reason
        seq.metrics.finished = time.perf_counter()
        return self._output(seq, text, tokens, lp, finish)

    @staticmethod
    def _output(seq: Sequence, text: str, tokens: list[int], lp, finish: str | None = None) -> RequestOutput:
        return RequestOutput(
            request_id=seq.request_id, text=text, token_ids=tokens,
            logprobs=None if seq.params.logprobs is None else ([lp] if lp is not None else []),
            finished=finish is not None, finish_reason=finish, num_prompt_tokens=seq.prompt_len,
            num_output_tokens=seq.num_output, metrics=seq.metrics, stop_reason=seq.stop_reason,
            priority=seq.priority, adapter=seq.adapter.name if seq.adapter is not None else None)


def load_embedding_model(spec: str | None):
    """The EmbeddingModel `spec` names ("builtin", a folder), or None."""
    if spec is None:
        return None
    from ..rag.embed import EmbeddingModel  # noqa: only servers that embed load the encoder

    if spec == "builtin":
        try:
            return EmbeddingModel.builtin()
        except ModelLoadError as e:
            log.warning("no /v1/embeddings: %s", e)
            return None
    return EmbeddingModel(spec)


EMBED_BUSY_TOKENS = 256  # tokens per embedding batch while generation runs (~35 ms for MiniLM on 2 AVX2 cores)


class EmbedShare:
    """How much of the step thread background embeddings may take while generation runs.

    Embeddings run on the step thread (one OpenMP pool for both: two pools on two cores made
    one MiniLM call 40x slower), between generation steps. A realtime embedding (a search
    query) runs at the next step. Standard and batch ones (an ingestion) earn time as
    generation steps run: `share` of the thread's busy time, so a realtime chat's time per
    output token grows by at most share/(1-share) while a bulk ingestion runs, and the
    ingestion still moves. With no generation waiting, embeddings take the whole thread."""

    def __init__(self, share: float = 0.25, cap_seconds: float = 0.25):
        self.ratio = share / (1 - share)
        self.cap = cap_seconds
        self.credit = 0.0  # seconds background embedding may take now

    def generated(self, seconds: float) -> None:
        self.credit = min(self.cap, self.credit + self.ratio * seconds)

    def may_run(self) -> bool:
        return self.credit > 0

    def embedded(self, seconds: float) -> None:
        self.credit -= seconds


def release_memory() -> None:
    """Gives freed memory back to the OS. glibc keeps freed heap pages mapped for reuse, so
    after dropping the weights the resident size only falls once `malloc_trim` returns them."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing more to ask for
        pass


class AsyncEngine:
    """The engine behind the server: a step thread, and one asyncio queue per request.

    The step thread also builds the engine (reads, converts and packs the weights), so it is
    the only thread that ever runs torch's parallel kernels. That matters: GNU OpenMP gives
    every thread that opens a parallel region its own pool of workers, and once the process
    holds more OpenMP threads than cores (a pool left behind by loading on the main thread,
    plus the step thread's), every barrier sleeps in the kernel instead of spinning. Measured
    on 2 cores: one int4 decode step took 15 ms that way instead of 7.5.
    """

    def __init__(self, config: EngineConfig, shared: "SharedStepLoop | None" = None):
        built = threading.Event()
        self._begin = threading.Event()  # start() was called: the loop may run
        self._shared = shared  # several models: one step thread ticks all their engines
        result: dict = {}

        def boot() -> None:
            try:
                result["engine"] = LLMEngine(config)
                result["embedding_model"] = load_embedding_model(config.embedding_model)
            except BaseException as e:  # re-raised by __init__ on the caller's thread
                result["error"] = e
                return
            finally:
                built.set()
            self._begin.wait()
            if not self._thread_stop:
                self._run()

        def boot_shared() -> None:
            try:
                result["engine"] = LLMEngine(config)
                result["embedding_model"] = load_embedding_model(config.embedding_model)
            except BaseException as e:
                result["error"] = e

        self._thread_stop = False  # the step thread exits
        if shared is None:
            self._thread = threading.Thread(target=boot, name="leanserve-engine", daemon=True)
            self._thread.start()
        else:  # built on the shared step thread, which then ticks it (see SharedStepLoop)
            self._thread = shared.thread
            shared.call(lambda: (boot_shared(), built.set()))
        built.wait()
        if "error" in result:
            raise result["error"]
        self.engine: LLMEngine = result["engine"]
        self.config = config
        self.tokenizer = self.engine.tokenizer
        self.model_name = self.engine.model_name
        self.lora = self.engine.lora
        self.max_model_len = self.engine.max_model_len
        self.ledger = self.engine.ledger
        self.grammars = self.engine.grammars
        self.embedding_model = result["embedding_model"]  # None: no /v1/embeddings
        self.embeddings = self._embedding_batcher()
        self._embed_ids = itertools.count()
        self._embed_share = EmbedShare()
        # Background work on this thread between steps (tune/jobs.py: training slices): each a
        # callable(LLMEngine) -> bool, True when it ran; it decides itself whether it may run now.
        self.background: list = []
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()  # ("add", seq) | ("abort", id)
        self._wake = shared.wake if shared is not None else threading.Event()
        self._streams: dict[str, asyncio.Queue] = {}
        self._client_of: dict[str, str] = {}  # request id -> client, until its last output
        self._client_seqs: dict[str, int] = {}  # client -> its sequences in the engine
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping = False  # no new requests
        # Requests handed to the step thread / taken in by it; each counter has one writer.
        self._sent = 0
        self._received = 0
        self.loading = False  # the step thread is reading the weights back in
        self._last_busy = time.monotonic()  # when the engine last had work (for idle unload)
        self._keep_alive: float | None = None  # the latest request's keep_alive, None: the config's

    @property
    def loaded(self) -> bool:
        return self.engine.loaded

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._last_busy = time.monotonic()  # idle time counts from serving, not from loading
        if self._shared is not None:
            self._shared.add(self)
        self._begin.set()

    def add_request(self, request_id: str, prompt: str | list[int], params: SamplingParams,
                    priority: int = 0, adapter: str | None = None, client: str | None = None,
                    max_tokens_cap: int | None = None) -> AsyncIterator[RequestOutput]:
        return self.add_requests([(request_id, prompt, params)], priority, adapter, client, max_tokens_cap)[0]

    def add_requests(self, requests: list[tuple[str, str | list[int], SamplingParams]], priority: int = 0,
                     adapter: str | None = None, client: str | None = None,
                     max_tokens_cap: int | None = None) -> list[AsyncIterator[RequestOutput]]:
        """Admits (request id, prompt, params) sequences all together or none of them: a
        refused request leaves nothing behind that would count against the next callers.
        `client` (an API key's hash, an address) is held to `max_seqs_per_client`."""
        if self._stopping:
            raise Overloaded("the server is shutting down")
        count = len(requests)
        if self.engine.num_waiting + self._sent - self._received + count > self.config.max_waiting:
            raise Overloaded(f"too many waiting requests (at most {self.config.max_waiting}); retry later")
        held, cap = self._client_seqs.get(client, 0), self.config.max_seqs_per_client
        if client is not None and count > cap:  # would never fit: not a retry-later
            raise InvalidRequest(f"this request asks for {count} sequences; a client may have at most {cap} in the "
                                 "engine at once (--max-seqs-per-client)")
        if client is not None and held + count > cap:
            raise Overloaded(f"this client already has {held} sequences in the engine and may have at most "
                             f"{cap} (--max-seqs-per-client); retry when some finish")
        if any(rid in self._streams for rid, _, _ in requests):
            raise InvalidRequest("a request id is already in use")
        seqs = [self.engine.make_sequence(rid, prompt, params, priority, adapter, client, max_tokens_cap)
                for rid, prompt, params in requests]
        streams = []
        for seq in seqs:
            q: asyncio.Queue = asyncio.Queue()
            self._streams[seq.request_id] = q
            if client is not None:
                self._client_of[seq.request_id] = client
            streams.append(self._stream(seq.request_id, q))
            self._inbox.put(("add", seq))
        if client is not None:
            self._client_seqs[client] = held + count
        self._sent += count
        self._wake.set()
        return streams

    async def _stream(self, request_id: str, q: asyncio.Queue) -> AsyncIterator[RequestOutput]:
        finished = False
        try:
            while not finished:
                out = await q.get()
                finished = out.finished
                yield out
        finally:
            self._streams.pop(request_id, None)
            if not finished:
                self.abort(request_id)

    def abort(self, request_id: str) -> None:
        self._inbox.put(("abort", request_id))
        self._wake.set()

    def _embedding_batcher(self):
        if self.embedding_model is None:
            return None
        from ..rag.embed import EmbeddingBatcher  # noqa: only servers that embed

        return EmbeddingBatcher(self.embedding_model)

    async def embed(self, token_lists: list[list[int]], priority: int = 0, truncate: bool = False):
        """(float32 [n, dim] numpy embeddings, their Bill), computed on the step thread in
        token-bounded batches between generation steps (see EmbedShare). Inputs over the
        model's length raise InvalidRequest unless `truncate`."""
        if self.embeddings is None:
            raise InvalidRequest("this server has no embedding model", param="model")
        if self._stopping:
            raise Overloaded("the server is shutting down")
        tag = f"embd-{next(self._embed_ids)}"
        future = self.embeddings.submit(token_lists, priority, truncate=truncate, tag=tag)
        self._wake.set()
        try:
            vectors = await asyncio.wrap_future(future)
        except asyncio.CancelledError:
            future.cancel()  # the batcher drops its inputs that have not run
            raise
        finally:
            bill = self.ledger.close(tag)
        return vectors.numpy(), bill

    def stats(self) -> dict:
        e = self.engine
        return {"num_running": len(e.scheduler.running), "num_waiting": e.num_waiting + self._sent - self._received,
                "kv_blocks_total": e.kv.num_blocks, "kv_blocks_free": e.kv.num_free_blocks,
                "num_preemptions": e.scheduler.num_preemptions,
                "prefix_cache_queried_tokens": e.kv.queried_tokens, "prefix_cache_hit_tokens": e.kv.hit_tokens,
                "tokens_run": e.tokens_run, "model_loaded": e.loaded, "model_unloads": e.num_unloads,
                "model_load_seconds": list(e.load_seconds),
                "structured_tokens": e.constrained_tokens, "structured_forced_tokens": e.forced_tokens,
                "structured_mask_seconds": e.masks.mask_seconds, "structured_compile_seconds": e.grammars.compile_seconds,
                "max_loras": e.lora.config.max_loras,
                "running_adapters": sorted({s.adapter.name for s in list(e.scheduler.running) if s.adapter}),
                "waiting_adapters": sorted({s.adapter.name for s in list(e.scheduler.waiting) if s.adapter})}

    async def shutdown(self, timeout: float = 5.0) -> None:
        """Stops admitting, lets running requests finish for `timeout` s, aborts the rest and
        waits (as long again at most) for their abort outputs, so that each can still answer,
        before the step thread stops. A second call finds nothing left to wait for."""
        async def drained() -> None:
            deadline = time.monotonic() + timeout
            while self._streams and time.monotonic() < deadline:
                await asyncio.sleep(0.05)

        self._stopping = True
        await drained()
        for rid in list(self._streams):
            self.abort(rid)
        await drained()  # the step thread takes the aborts in after the step it is running
        self._thread_stop = True
        self._wake.set()
        self._begin.set()
        if self._shared is not None:  # the shared thread drops this engine at its next turn
            await asyncio.to_thread(self._shared.forget, self, 10)
        else:
            await asyncio.to_thread(self._thread.join, 10)
        if self.embeddings is not None:
            self.embeddings.cancel_all(Overloaded("the server is shutting down"))

    # -- the step thread --------------------------------------------------------------------

    def _deliver(self, out: RequestOutput) -> None:
        """Runs on the event loop. A finished request leaves `_streams` here, so one whose
        stream was never iterated does not linger."""
        q = self._streams.pop(out.request_id, None) if out.finished else self._streams.get(out.request_id)
        if q is not None:
            q.put_nowait(out)
        client = self._client_of.pop(out.request_id, None) if out.finished else None
        if client is not None:
            self._client_seqs[client] -= 1
            if not self._client_seqs[client]:
                del self._client_seqs[client]

    def _drain_inbox(self) -> list[RequestOutput]:
        outs = []
        while True:
            try:
                kind, item = self._inbox.get_nowait()
            except queue.Empty:
                return outs
            if kind == "add":
                self._received += 1
                try:
                    self.engine.add_sequence(item)
                except InvalidRequest as e:
                    log.warning("rejected %s: %s", item.request_id, e)
                    outs.append(LLMEngine._output(item, "", [], None, "abort"))
            else:
                out = self.engine.abort(item)
                if out is not None:
                    outs.append(out)

    def _run(self) -> None:
        while not self._thread_stop:
            if not self._tick():
                self._idle()
                self._wake.wait(0.5)
                self._wake.clear()

    def _tick(self) -> bool:
        """One turn of the step loop: inbox, background work, one engine step. False when
        there was nothing to do (then the loop may sleep)."""
        if self.embeddings is not None and self.embeddings.has_work():
            self._run_embeddings()
        outs = self._drain_inbox()
        ran = any([task(self.engine) for task in list(self.background)])
        if self.engine.has_unfinished():
            self._last_busy = time.monotonic()
            if not self.engine.loaded:
                self._reload()
            try:
                started = time.perf_counter()
                outs += self.engine.step()
                self._embed_share.generated(time.perf_counter() - started)
            except Exception as e:  # a bug that the step's own recovery could not contain
                log.exception("engine step failed; aborting the running requests")
                for rid in list(self.engine.seqs):
                    out = self.engine.abort(rid)
                    out.error = RequestError(500, f"The engine step failed: {e!r}", "engine_error")
                    outs.append(out)
        if outs:
            self._loop.call_soon_threadsafe(self._deliver_all, outs)
            return True
        return ran or self.engine.has_unfinished() or (self.embeddings is not None and self.embeddings.has_work())

    def _idle(self) -> None:
        self.engine.ledger.poll()  # idle energy, and RAPL read at least once per wrap
        self._unload_if_idle()

    def urgency(self) -> int | None:
        """The most urgent service class with work in this engine or on its way (lower is more
        urgent, PRIORITY_CLASSES), None when it has none: the shared step loop's order."""
        if self._sent != self._received:
            return 0  # not taken in yet: unknown class, look at once
        sched = self.engine.scheduler
        pending = list(sched.waiting) + list(sched.running)
        if pending:
            return min(s.priority for s in pending)
        return 0 if self.engine.has_unfinished() else None

    def _run_embeddings(self) -> None:
        """One token-bounded embedding batch, if EmbedShare lets it run now."""
        busy = self.engine.has_unfinished()
        if busy and self.embeddings.head_priority() > 0 and not self._embed_share.may_run():
            return
        batch = self.embeddings.next_batch(EMBED_BUSY_TOKENS if busy else None)
        if not batch:
            return
        started = time.perf_counter()
        with self.ledger.step([Work(item.request.tag, len(item.tokens), 0, False) for item in batch]):
            result = self.embeddings.compute(batch)
        self.embeddings.deliver(batch, *result)  # after the step closed: the waiters then close their bills
        if busy:
            self._embed_share.embedded(time.perf_counter() - started)

    def set_keep_alive(self, seconds: float | None) -> None:
        """Ollama's keep_alive, for a server that scales to zero: the latest request's value
        (negative: never unload) holds the model longer than idle_unload_seconds, never
        shorter: on a shared server one client must not unload the model under the others
        (Ollama's 0, unload at once, is a single user's choice). None: the server's setting."""
        self._keep_alive = seconds

    def _unload_if_idle(self) -> None:
        """Scale to zero: no request in the engine or on its way for idle_unload_seconds (or the
        latest request's longer keep_alive)."""
        limit, keep = self.config.idle_unload_seconds, self._keep_alive
        if limit is not None and keep is not None:
            limit = None if keep < 0 else max(limit, keep)
        if (limit is not None and self.engine.loaded and self._sent == self._received
                and time.monotonic() - self._last_busy >= limit):
            self.engine.unload()
            log.info("model unloaded after %.0f idle seconds", limit)

    def _reload(self) -> None:
        """Loads the weights back for the requests that arrived; they (and any arriving
        meanwhile) wait in the scheduler. A failed load fails them, not the server."""
        self.loading = True
        try:
            self.engine.load()
            log.info("model loaded again in %.2f s", self.engine.load_seconds[-1])
        except Exception:
            log.exception("reloading the model failed")  # step() tries again, and fails them
        finally:
            self.loading = False

    def _deliver_all(self, outs: list[RequestOutput]) -> None:
        for out in outs:
            self._deliver(out)


class SharedStepLoop:
    """One step thread for several engines (several models in one server).

    One thread, not one per model: GNU OpenMP keeps a worker pool per thread that opens a
    parallel region, and two compute threads on a small machine thrash (see AsyncEngine). So
    this thread builds every engine and then ticks them one step at a time, choosing fairly
    by service class: the engine whose most urgent work is the most urgent class goes next
    (a model with waiting realtime requests steps before another's batch work), round-robin
    among equals, so a busy model cannot starve another's realtime requests."""

    def __init__(self):
        self.wake = threading.Event()
        self.engines: list[AsyncEngine] = []
        self._calls: queue.SimpleQueue = queue.SimpleQueue()
        self._turn = 0
        self.thread = threading.Thread(target=self._run, name="leanserve-engines", daemon=True)
        self.thread.start()

    def call(self, fn) -> None:
        """Runs `fn` on the step thread (building an engine there)."""
        self._calls.put(fn)
        self.wake.set()

    def add(self, engine: "AsyncEngine") -> None:
        self.call(lambda: self.engines.append(engine))

    def forget(self, engine: "AsyncEngine", timeout: float) -> None:
        done = threading.Event()

        def drop():
            if engine in self.engines:
                self.engines.remove(engine)
            done.set()

        self.call(drop)
        done.wait(timeout)

    def next_engine(self) -> "AsyncEngine | None":
        ready = [(e.urgency(), i) for i, e in enumerate(self.engines) if e._begin.is_set()]
        ready = [(u, i) for u, i in ready if u is not None]
        if not ready:
            return None
        best = min(u for u, _ in ready)
        n = len(self.engines)
        i = min((i for u, i in ready if u == best), key=lambda i: (i - self._turn) % n)
        self._turn = (i + 1) % n
        return self.engines[i]

    def _run(self) -> None:
        while True:
            while True:
                try:
                    self._calls.get_nowait()()
                except queue.Empty:
                    break
            engine = self.next_engine()
            if engine is not None and engine._tick():
                continue
            ran = False
            for e in list(self.engines):  # inboxes, aborts, background work of the others
                if e._begin.is_set() and e._loop is not None and e._tick():
                    ran = True
            if ran:
                continue
            for e in self.engines:
                if e._begin.is_set():
                    e._idle()
            self.wake.wait(0.5)
            self.wake.clear()
