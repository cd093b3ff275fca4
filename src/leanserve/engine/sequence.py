"""Plain data of one request: its sampling parameters, its state, and what it streams out."""
from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

from ..energy.ledger import Bill


@dataclass
class SamplingParams:
    """Per-request sampling, the OpenAI / vLLM parameters. `temperature=0` is greedy."""

    max_tokens: int | None = 16  # None: up to the context length
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: off
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    min_tokens: int = 0
    ignore_eos: bool = False
    logprobs: int | None = None  # None: no logprobs; k >= 0: the chosen token's + top k
    # structured output (engine/structured.Constraint): every token is sampled from what its
    # grammar allows; forced tokens are appended without sampling (unless logprobs are asked)
    constraint: object = None

    def __post_init__(self):
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = [s for s in (self.stop or []) if s]
        if self.top_k == -1:
            self.top_k = 0
        self.validate()

    def validate(self) -> None:
        def bad(name, why):
            raise ValueError(f"{name} {why}")

        if self.max_tokens is not None and self.max_tokens < 0:
            bad("max_tokens", f"must be >= 0, got {self.max_tokens}")
        if not 0.0 <= self.temperature <= 100.0:
            bad("temperature", f"must be in [0, 100], got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            bad("top_p", f"must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            bad("top_k", f"must be -1, 0 (off) or positive, got {self.top_k}")
        if not 0.0 <= self.min_p <= 1.0:
            bad("min_p", f"must be in [0, 1], got {self.min_p}")
        if not -2.0 <= self.presence_penalty <= 2.0:
            bad("presence_penalty", f"must be in [-2, 2], got {self.presence_penalty}")
        if not -2.0 <= self.frequency_penalty <= 2.0:
            bad("frequency_penalty", f"must be in [-2, 2], got {self.frequency_penalty}")
        if not 0.0 < self.repetition_penalty <= 2.0:
            bad("repetition_penalty", f"must be in (0, 2], got {self.repetition_penalty}")
        if self.min_tokens < 0:
            bad("min_tokens", f"must be >= 0, got {self.min_tokens}")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            bad("min_tokens", f"({self.min_tokens}) must not exceed max_tokens ({self.max_tokens})")
        if self.logprobs is not None and not 0 <= self.logprobs <= 20:
            bad("logprobs", f"must be in [0, 20], got {self.logprobs}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass
class Logprob:
    """The chosen token's log-probability and the top alternatives (token id, logprob)."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]]


@dataclass
class RequestMetrics:
    """Wall-clock stamps (time.perf_counter) of one request's life."""

    arrival: float = field(default_factory=time.perf_counter)
    first_scheduled: float | None = None
    first_token: float | None = None
    finished: float | None = None

    @property
    def queue_ms(self) -> float:
        return 1000 * ((self.first_scheduled or self.arrival) - self.arrival)

    @property
    def prefill_ms(self) -> float:
        """Time from first scheduled to first token (the prefill's share of the latency)."""
        if self.first_token is None or self.first_scheduled is None:
            return 0.0
        return 1000 * (self.first_token - self.first_scheduled)

    @property
    def decode_ms(self) -> float:
        if self.first_token is None or self.finished is None:
            return 0.0
        return 1000 * (self.finished - self.first_token)


@dataclass
class RequestError:
    """Why the engine ended one request early; the server answers it with `status`."""

    status: int  # 400: the request's own fault (e.g. its adapter's file went bad); 500: ours
    message: str
    code: str | None = None
    param: str | None = None


@dataclass
class RequestOutput:
    """One streamed delta of a request. Concatenating every `text` gives the whole answer."""

    request_id: str
    text: str
    token_ids: list[int]
    logprobs: list[Logprob] | None
    finished: bool
    finish_reason: str | None  # "stop" | "length" | "abort" | None while running
    num_prompt_tokens: int
    num_output_tokens: int
    metrics: RequestMetrics
    stop_reason: str | int | None = None  # the stop string or token id that ended it
    priority: int = 0  # the request's service class (PRIORITY_CLASSES)
    bill: Bill | None = None  # energy, carbon and cost; set on the finished output
    adapter: str | None = None  # the LoRA adapter's name; None: the base model
    # set when finish_reason is "abort" because this request alone failed (the others run on)
    error: RequestError | None = None


# Service classes: a lower number is more urgent. Direct API calls are realtime by default,
# async requests standard, Batch API work batch.
PRIORITY_CLASSES = {"realtime": 0, "standard": 1, "batch": 2}
CLASS_NAMES = {v: k for k, v in PRIORITY_CLASSES.items()}


class SeqStatus(enum.Enum):
    WAITING = 0
    RUNNING = 1
    FINISHED = 2


class Sequence:
    """One request inside the engine: tokens, KV blocks, progress through them.

    `num_computed` counts tokens whose K/V sit in the cache; a step feeds the tokens after
    them (a prefill chunk, or the one newest token when decoding).
    Preemption drops the blocks and sets num_computed to 0: prompt and output so far are
    recomputed as one prefill later, which gives the same tokens.
    """

    def __init__(self, seq_id: int, request_id: str, prompt_ids: list[int], params: SamplingParams,
                 max_tokens: int, priority: int = 0, adapter=None, client: str | None = None):
        self.seq_id = seq_id
        self.request_id = request_id
        self.prompt_len = len(prompt_ids)
        self.token_ids = list(prompt_ids)
        self.params = params
        self.max_tokens = max_tokens  # resolved against the context
        self.priority = priority
        self.adapter = adapter  # engine.lora.Adapter, or None for the base model
        self.client = client  # who sent it (API key or address): waiting turns are shared per client
        self.matcher = None  # llguidance matcher of its constraint (structured output), or None
        self.status = SeqStatus.WAITING
        self.block_table: list[int] = []
        self.block_hashes: list[bytes] = []  # prefix-cache names of its full, computed blocks
        self.num_computed = 0
        self.finish_reason: str | None = None
        self.stop_reason: str | int | None = None
        self.metrics = RequestMetrics()

    def __len__(self) -> int:
        return len(self.token_ids)

    @property
    def output_ids(self) -> list[int]:
        return self.token_ids[self.prompt_len:]

    @property
    def num_output(self) -> int:
        return len(self.token_ids) - self.prompt_len

    @property
    def num_uncomputed(self) -> int:
        return len(self.token_ids) - self.num_computed
