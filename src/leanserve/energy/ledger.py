"""Who used the joules: each engine step's energy split over its sequences by their FLOPs.

The ledger reads the meter when a step begins and when it ends. What the meter counted
since the previous read, before a step begins, is idle energy: reported, never billed.
What it counted during the step is split over the step's sequences in proportion to the
FLOPs of their new tokens (`chunk_flops`), and so are the step's carbon and cost. Every
joule the meter counts lands in exactly one place:
sum of all requests' joules + idle joules = meter total.
"""
from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Callable, Iterable, NamedTuple

from .carbon import CarbonConfig

if TYPE_CHECKING:
    from ..models.llama import ModelArgs
    from .meters import Meter


def chunk_flops(args: ModelArgs, start: int, n: int, sampled: bool) -> float:
    """FLOPs of running `n` new tokens of one sequence that has `start` tokens cached.

    - 2 per weight per token for every matrix product but the embedding lookup: q/k/v/o
      and the MLP (for a mixture of experts: its router and the experts a token uses);
    - 2*hidden*vocab for the logits of the last token, when it is sampled;
    - attention: the token at position p scores against p+1 keys, 2*head_dim FLOPs for
      q.k and 2*head_dim for the weighted sum of values, per head and layer. The engine
      masks a sliding window rather than skipping keys, so every key counts.
    Norms, RoPE, activations and softmax are left out (well under 1%).
    """
    return FlopModel(args)(start, n, sampled)


class FlopModel:
    """`chunk_flops` with the model's constants worked out once: the ledger calls it for
    every sequence of every step."""

    def __init__(self, args: ModelArgs):
        h, d = args.hidden_size, args.head_dim
        attn_weights = h * (args.num_heads + 2 * args.num_kv_heads) * d + args.num_heads * d * h
        mlp_weights = 3 * h * args.intermediate_size
        if args.num_experts:
            mlp_weights = h * args.num_experts + args.num_experts_per_tok * mlp_weights
        self.per_token = 2 * args.num_layers * (attn_weights + mlp_weights)
        self.logits = 2 * h * args.vocab_size
        self.per_key = 4 * args.num_layers * args.num_heads * d

    def __call__(self, start: int, n: int, sampled: bool) -> float:
        keys = n * start + n * (n + 1) // 2  # sum over the new tokens of (position + 1)
        return n * self.per_token + (self.logits if sampled else 0) + self.per_key * keys


class Work(NamedTuple):
    """One sequence's part of a step."""

    request_id: str
    new_tokens: int
    start: int  # tokens already in the KV cache
    sampled: bool  # its last new token gets logits and a sampled successor


def work_from_batch(batch: Iterable) -> list[Work]:
    """The engine's schedule, [(Sequence, new tokens)], before the step runs."""
    return [Work(seq.request_id, n, seq.num_computed, seq.num_computed + n == len(seq)) for seq, n in batch]


@dataclass
class Bill:
    """Energy, carbon and cost of one request, or a sum of them (totals, idle).

    `energy_joules` is metered IT energy; carbon and cost include the PUE.
    `active_seconds` is its share of step time (what embodied carbon and the machine price
    are charged on); `batch_size` is the mean number of sequences in its steps.
    """

    energy_joules: float = 0.0
    carbon_grams: float = 0.0
    cost_usd: float = 0.0
    active_seconds: float = 0.0
    steps: int = 0
    step_sequences: int = 0  # summed over its steps
    energy_source: str = ""

    @property
    def batch_size(self) -> float:
        return self.step_sequences / self.steps if self.steps else 0.0

    def __add__(self, other: Bill) -> Bill:
        sums = {name: getattr(self, name) + getattr(other, name) for name in _SUMMED}
        return Bill(**sums, energy_source=self.energy_source or other.energy_source)

    def add_share(self, step: Bill, share: float, step_sequences: int) -> None:
        """In place: `share` of one step's bill, as `self + Bill(step * share, 1 step)`
        would give, without building two Bills per sequence per step."""
        self.energy_joules += step.energy_joules * share
        self.carbon_grams += step.carbon_grams * share
        self.cost_usd += step.cost_usd * share
        self.active_seconds += step.active_seconds * share
        self.steps += 1
        self.step_sequences += step_sequences

    def usage(self) -> dict:
        """The fields `usage.leanserve` carries."""
        return {"energy_joules": round(self.energy_joules, 6), "carbon_grams": round(self.carbon_grams, 9),
                "cost_usd": round(self.cost_usd, 9), "energy_source": self.energy_source}


_SUMMED = tuple(f.name for f in fields(Bill) if f.name != "energy_source")


class EnergyLedger:
    """Reads the meter around each step and keeps each open request's bill.

    Thread-safe: the step thread calls begin/end/close, a metrics scrape may call poll
    and totals at the same time. `clock` (unix seconds) times the steps and picks the
    carbon intensity of the hour.
    """

    def __init__(self, meter: Meter, model_args: ModelArgs, carbon: CarbonConfig | None = None,
                 clock: Callable[[], float] = time.time):
        self.meter = meter
        self._flops = FlopModel(model_args)
        self.carbon = carbon or CarbonConfig()
        self.clock = clock
        self.source = meter.source
        self._lock = threading.Lock()
        self._open: dict[str, Bill] = {}
        self._step: list[Work] | None = None
        self._billed = Bill(energy_source=self.source)  # everything split over requests so far
        self._idle = Bill(energy_source=self.source)
        self._t = clock()
        self._j = meter.read_joules()
        self._j0 = self._j

    def _read(self) -> tuple[float, float, float]:
        """Joules and seconds since the previous read, and the previous read's time."""
        t, j = self.clock(), self.meter.read_joules()
        out = (j - self._j, max(t - self._t, 0.0), self._t)
        self._t, self._j = t, j
        return out

    def _charge(self, joules: float, seconds: float, ts: float) -> Bill:
        c = self.carbon
        return Bill(joules, c.grams(joules, seconds, ts), c.cost(joules, seconds), seconds,
                    energy_source=self.source)

    def _book_idle(self) -> None:
        joules, seconds, ts = self._read()
        self._idle += self._charge(joules, seconds, ts)

    def begin(self, work: list[Work]) -> None:
        """Call right before the step runs (after scheduling)."""
        with self._lock:
            if self._step is not None:
                raise RuntimeError("a step is already open")
            self._book_idle()
            self._step = work

    def end(self) -> None:
        """Call right after the step (forward pass and sampling) is done."""
        with self._lock:
            work, self._step = self._step, None
            if work is None:
                raise RuntimeError("no step is open")
            joules, seconds, ts = self._read()
            if not work:
                self._idle += self._charge(joules, seconds, ts)
                return
            step = self._charge(joules, seconds, ts)
            flops = self._flops
            shares = [flops(w.start, w.new_tokens, w.sampled) for w in work]
            total = sum(shares)
            for w, f in zip(work, shares):
                bill = self._open.get(w.request_id)
                if bill is None:
                    bill = self._open[w.request_id] = Bill(energy_source=self.source)
                bill.add_share(step, f / total, len(work))
            self._billed += Bill(step.energy_joules, step.carbon_grams, step.cost_usd, step.active_seconds,
                                1, len(work), self.source)

    @contextmanager
    def step(self, work: list[Work]):
        """`with ledger.step(work_from_batch(batch)): ...run the step...`"""
        self.begin(work)
        try:
            yield
        finally:
            self.end()

    def poll(self) -> None:
        """Books the energy since the last read as idle; nothing while a step is open.
        Call it when the engine idles (RAPL counters must be read once per wrap period)
        and before reading totals for a scrape."""
        with self._lock:
            if self._step is None:
                self._book_idle()

    def close(self, request_id: str) -> Bill:
        """The request's final bill (an empty one if it never ran). Call after `end()` of
        its last step."""
        with self._lock:
            if self._step is not None and any(w.request_id == request_id for w in self._step):
                raise RuntimeError(f"{request_id!r} is in the open step; close it after end()")
            return self._open.pop(request_id, None) or Bill(energy_source=self.source)

    def totals(self) -> tuple[Bill, Bill, float]:
        """(billed to requests, idle, meter joules since the ledger was made), as of the
        last read: billed.energy_joules + idle.energy_joules == the third."""
        with self._lock:
            return self._billed, self._idle, self._j - self._j0
