"""Structured outputs: grammars compiled by llguidance, one matcher per constrained sequence.

A `Constraint` names what a request's output must be (a JSON schema, any JSON object, a
regex, one of a few strings, a Lark or GBNF grammar). `GrammarCompiler` turns it into an
llguidance matcher: the tokenizer bridge is built once per model (~0.3 s), each grammar is
validated and compiled once and cached by its text (a few ms for usual schemas), and every
sequence gets a cheap deep copy of the cached matcher. Compilation runs on the compiler's own
threads (`compile_async`), never on the step loop, and `LLParserLimits` bounds what a hostile
grammar may cost, so a bad schema is a 400 for its own request only.

Each step, `MaskBatch` computes the token masks of the constrained rows about to be sampled,
on a worker thread while the forward pass runs (the rows are known before it starts), and
the sampler sets the logits of disallowed tokens to -inf. Generated JSON is compact (no
optional whitespace: small models otherwise fill their budget with newlines), and tokens the
grammar forces are appended without sampling (`forced_tokens`).
"""
from __future__ import annotations

import asyncio
import collections
import json
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from ..errors import InvalidRequest

try:  # a core dependency; imported lazily so that unconstrained serving never needs it
    import llguidance as llg
    from llguidance.gbnf_to_lark import gbnf_to_lark
except ImportError:  # pragma: no cover
    llg = None

COMPILE_TIMEOUT_SECONDS = 10.0  # past this a grammar is refused as too complex
# Compiles at once: a few slow schemas must not queue every other request's compile behind
# them (the timeout counts the wait for a thread). llguidance drops the GIL while it builds.
COMPILE_THREADS = 16
CACHE_SIZE = 256  # compiled grammars kept (by grammar text)
KINDS = ("json", "json_object", "regex", "choice", "grammar")


class Timings:
    """Durations of one kind: the latest ones (for percentiles) and cumulative histogram
    buckets (for Prometheus). Written by one thread at a time, read by any."""

    def __init__(self, buckets: tuple[float, ...], keep: int = 65536):
        self.buckets = buckets
        self.counts = [0] * len(buckets)  # cumulative: durations <= buckets[i]
        self.count, self.sum = 0, 0.0
        self.latest: collections.deque[float] = collections.deque(maxlen=keep)

    def record(self, seconds: float) -> None:
        self.latest.append(seconds)
        self.count += 1
        self.sum += seconds
        for i, le in enumerate(self.buckets):
            if seconds <= le:
                self.counts[i] += 1

    def __len__(self) -> int:  # reads like the deque of the latest durations
        return len(self.latest)

    def __iter__(self):
        return iter(list(self.latest))

    def clear(self) -> None:
        self.latest.clear()

    def quantile(self, q: float) -> float | None:
        values = sorted(self.latest)
        return values[min(len(values) - 1, int(q * len(values)))] if values else None


MASK_BUCKETS = (5e-6, 1e-5, 2e-5, 5e-5, 1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 5e-2)
COMPILE_BUCKETS = (1e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 2e-2, 5e-2, 0.1, 0.25, 0.5, 1, 2.5, 10)


def _limits():
    # llguidance's defaults, with tighter fuel: a grammar that needs more is refused at compile
    # time (max_grammar_size, initial_lexer_fuel) or ends its own sequence (step fuel), never
    # a step of everyone's.
    return llg.LLParserLimits(max_items_in_row=2000, initial_lexer_fuel=1_000_000, step_lexer_fuel=200_000,
                              step_max_items=50_000, max_lexer_states=250_000, max_grammar_size=500_000,
                              verbose_errors=False)


@dataclass(eq=False)
class Constraint:
    """What one request's output must match. `kind` is one of KINDS; `value` a JSON schema
    (dict) for "json", a regex string, a list of strings for "choice", a Lark or GBNF grammar
    text for "grammar", None for "json_object". `strict` False ignores JSON-schema keywords
    the engine cannot enforce instead of refusing the schema. `param` names the request field
    errors point at. `compiled` holds the matcher once `GrammarCompiler` has built it."""

    kind: str
    value: object = None
    strict: bool = True
    param: str | None = None
    compiled: object = field(default=None, repr=False)

    def grammar(self) -> str:
        """The llguidance grammar text (its JSON form, or Lark)."""
        if self.kind == "json":
            if not isinstance(self.value, dict):
                raise InvalidRequest("a JSON schema must be an object", self.param)
            return llg.LLMatcher.grammar_from_json_schema(
                self.value, defaults={"whitespace_flexible": False, "lenient": not self.strict})
        if self.kind == "json_object":
            return llg.LLMatcher.grammar_from_json_schema({"type": "object"}, defaults={"whitespace_flexible": False})
        if self.kind == "regex":
            return llg.LLMatcher.grammar_from_regex(str(self.value))
        if self.kind == "choice":
            if not self.value or not all(isinstance(c, str) and c for c in self.value):
                raise InvalidRequest("choice must be a non-empty list of non-empty strings", self.param)
            return llg.LLMatcher.grammar_from_lark("start: " + " | ".join(json.dumps(c) for c in self.value))
        if self.kind == "grammar":
            text = str(self.value)
            if "::=" in text:  # GBNF (llama.cpp's), else Lark
                try:
                    text = gbnf_to_lark(text)
                except Exception as e:
                    raise InvalidRequest(f"invalid GBNF grammar: {e}", self.param) from None
            return llg.LLMatcher.grammar_from_lark(text)
        raise InvalidRequest(f"unknown structured output kind {self.kind!r}", self.param)


def json_schema_lark(schema: dict, strict: bool = True) -> str:
    """A JSON schema as a Lark `%json` block, with the same options as `Constraint("json")`."""
    options = {"whitespace_flexible": False, "lenient": not strict}
    return "%json " + json.dumps(dict(schema, **{"x-guidance": options}))


class GrammarCompiler:
    """Compiles constraints for one tokenizer; thread-safe. Keeps compile times for reports."""

    def __init__(self, tokenizer, vocab_size: int):
        self._source = tokenizer
        self.vocab_size = vocab_size  # the model's: its logits may be wider than the tokenizer
        self._tokenizer = None
        self._lock = threading.Lock()
        self._cache: collections.OrderedDict[str, object] = collections.OrderedDict()
        self._pool = ThreadPoolExecutor(COMPILE_THREADS, thread_name_prefix="leanserve-grammar")
        self.compile_seconds = Timings(COMPILE_BUCKETS, keep=4096)  # uncached compiles

    @property
    def tokenizer(self):
        with self._lock:
            if self._tokenizer is None:
                if llg is None:
                    raise InvalidRequest("structured outputs need the llguidance package (pip install llguidance)")
                self._tokenizer = llg.LLTokenizer(self._source._tok.to_str(), n_vocab=self.vocab_size,
                                                  eos_token=sorted(self._source.eos_token_ids))
            return self._tokenizer

    def compile(self, constraint: Constraint):
        """The constraint's prototype matcher (cached; also kept on `constraint.compiled`), or
        InvalidRequest naming what is wrong with it."""
        if constraint.compiled is not None:
            return constraint.compiled
        try:
            grammar = constraint.grammar()
        except InvalidRequest:
            raise
        except Exception as e:  # llguidance's ValueError, or anything a hostile value provokes
            raise InvalidRequest(f"invalid {_NAMES.get(constraint.kind, constraint.kind)}: {e}",
                                 constraint.param) from None
        tokenizer = self.tokenizer
        with self._lock:
            matcher = self._cache.get(grammar)
            if matcher is not None:
                self._cache.move_to_end(grammar)
        if matcher is None:
            started = time.perf_counter()
            limits = _limits()
            try:
                is_error, messages = llg.LLMatcher.validate_grammar_with_warnings(grammar, tokenizer, limits=limits)
            except Exception as e:
                is_error, messages = True, [str(e)]
            if is_error and any("Unimplemented" in m for m in messages):
                raise InvalidRequest(f"this {_NAMES[constraint.kind]} uses keywords the engine cannot enforce: "
                                     f"{'; '.join(messages)} (with strict false they are ignored)", constraint.param)
            if is_error:
                raise InvalidRequest(f"invalid {_NAMES[constraint.kind]}: {'; '.join(messages)}", constraint.param)
            if constraint.strict and messages:  # unenforceable keywords, a strict schema must not have them
                raise InvalidRequest(f"this {_NAMES[constraint.kind]} cannot be enforced: {'; '.join(messages)} "
                                     "(set strict to false to have such keywords ignored)", constraint.param)
            matcher = llg.LLMatcher(tokenizer, grammar, limits=limits, log_level=0)
            if matcher.is_error():
                raise InvalidRequest(f"invalid {_NAMES[constraint.kind]}: {matcher.get_error()}", constraint.param)
            self.compile_seconds.record(time.perf_counter() - started)
            with self._lock:
                self._cache[grammar] = matcher
                while len(self._cache) > CACHE_SIZE:
                    self._cache.popitem(last=False)
        constraint.compiled = matcher
        return matcher

    async def compile_async(self, constraint: Constraint, timeout: float = COMPILE_TIMEOUT_SECONDS):
        """`compile` on the compiler's threads; a grammar still compiling after `timeout` is refused."""
        future = asyncio.get_running_loop().run_in_executor(self._pool, self.compile, constraint)
        try:
            return await asyncio.wait_for(future, timeout)
        except TimeoutError:
            raise InvalidRequest(f"the {_NAMES[constraint.kind]} took longer than {timeout:g} s to compile; "
                                 "simplify it", constraint.param) from None

    def matcher(self, constraint: Constraint):
        """A fresh matcher for one sequence."""
        return self.compile(constraint).deep_copy()


_NAMES = {"json": "JSON schema", "json_object": "JSON object constraint", "regex": "regex",
          "choice": "choice", "grammar": "grammar"}


class MaskBatch:
    """Token masks of one step's constrained rows, computed on a worker thread.

    `start(seqs)` is called before the forward pass with the sequences about to be sampled;
    `result()` after it gives, for each constrained one, a bool tensor [vocab] of the tokens
    its grammar allows (by seq_id). Records each mask's time, for the benchmark's p50/p99.
    """

    def __init__(self, vocab_size: int, eos_ids: set[int]):
        self.vocab_size = vocab_size
        self.eos_ids = sorted(t for t in eos_ids if t < vocab_size)
        self.words = (vocab_size + 31) // 32
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="leanserve-masks")
        self._future: Future | None = None
        self.mask_seconds = Timings(MASK_BUCKETS)

    def start(self, seqs: list) -> None:
        rows = [(s.seq_id, s.matcher) for s in seqs if s.matcher is not None]
        self._future = self._pool.submit(self._compute, rows) if rows else None

    def _compute(self, rows: list) -> tuple[list[int], torch.Tensor]:
        """llguidance's bitmasks (bit t%32 of word t//32 set: token t allowed). No torch
        kernels here: a second thread opening OpenMP regions would slow every step."""
        out = torch.empty(len(rows), self.words, dtype=torch.int32)
        for k, (_, matcher) in enumerate(rows):
            started = time.perf_counter()
            row = out[k]
            matcher.unsafe_compute_mask_ptr(row.data_ptr(), row.numel() * 4)
            self.mask_seconds.record(time.perf_counter() - started)
        return [seq_id for seq_id, _ in rows], out

    def result(self) -> dict[int, torch.Tensor]:
        """seq_id -> allowed tokens; empty when no row is constrained."""
        future, self._future = self._future, None
        if future is None:
            return {}
        seq_ids, bitmask = future.result()
        # little-endian words: byte b of the row holds tokens 8b..8b+7, one bit each
        allowed = _BYTE_BITS[bitmask.view(torch.uint8).long()].view(len(seq_ids), -1)[:, :self.vocab_size]
        stuck = ~allowed.any(dim=1)  # a matcher in its error state allows nothing: let it end
        if stuck.any() and self.eos_ids:
            allowed[stuck.nonzero().flatten().unsqueeze(1), torch.tensor(self.eos_ids)] = True
        return dict(zip(seq_ids, allowed))


_BYTE_BITS = ((torch.arange(256).unsqueeze(1) >> torch.arange(8)) & 1).bool()  # byte -> its 8 bits, low first


def forced_tokens(matcher) -> list[int]:
    """Tokens the grammar allows exactly one way from here (llguidance's fast-forward)."""
    return matcher.compute_ff_tokens() if not matcher.is_stopped() else []
