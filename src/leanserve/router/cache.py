"""The response cache: answer a request that was answered before without running the model.

Two kinds of hit, both opt-in (`--response-cache exact|semantic`, and per request):

- exact: the normalised request (model, adapter, messages, sampling, format, tools) hashed;
- semantic: the same request *scope* (everything but the last user turn: model, adapter,
  system prompt, history, sampling, format, tools) and a last user turn whose embedding is
  within `threshold` cosine similarity of a cached one's.

Only deterministic requests are cached (temperature 0, or a seed): replaying a sampled
answer would silently turn sampling off. Entries are kept per tenant (the API key: a
tenant never gets another's answers), expire after `ttl_seconds`, are evicted least
recently used past `max_entries`, and stop matching when the adapter they were made with is
replaced or removed (an entry keeps a weak reference to the adapter object it ran on).
"""
from __future__ import annotations

import hashlib
import json
import threading
import time
import weakref
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np

MODES = ("off", "exact", "semantic")
# Chosen from the paraphrase benchmark (`leanserve bench cache`, BENCHMARKS.md): on
# all-MiniLM-L6-v2 the lowest threshold with no false hit among the set's hard negatives
# (precision 1.0, 84% of paraphrases hit; 0.81 already gives >= 95% precision on that
# half-paraphrase set, but real traffic has far fewer paraphrases, so precision there is lower).
DEFAULT_SEMANTIC_THRESHOLD = 0.9
# Request fields that do not change the answer: never part of a key.
UNKEYED = frozenset({"stream", "stream_options", "user", "priority", "cache", "metadata", "store"})


@dataclass
class Entry:
    body: dict  # the response as it was first sent
    joules: float  # what computing it cost: the energy a hit saves
    tenant: str
    adapter: weakref.ref | None  # the adapter object it ran on, None for the base model
    created: float = field(default_factory=time.monotonic)
    scope: str = ""
    vector: np.ndarray | None = None  # normalised embedding of the last user turn (semantic)


@dataclass
class Hit:
    body: dict
    kind: str  # "exact" | "semantic"
    similarity: float
    saved_joules: float


def digest(fields: dict) -> str:
    return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()


def deterministic(fields: dict) -> bool:
    return fields.get("temperature") == 0 or fields.get("seed") is not None


def split_last_user_turn(messages: list[dict]) -> tuple[list[dict], str | None]:
    """(the messages before the last user turn, that turn's text); None when the last message
    is not a plain-text user turn (tool results, images: no semantic match)."""
    if not messages or messages[-1].get("role") != "user":
        return messages, None
    content = messages[-1].get("content")
    if isinstance(content, list):
        if not all(isinstance(p, dict) and p.get("type") == "text" for p in content):
            return messages, None
        content = "".join(p.get("text", "") for p in content)
    return messages[:-1], content if isinstance(content, str) and content.strip() else None


class ResponseCache:
    """Thread-safe; lookups are O(entries in the scope) for semantic hits (a dot product each)."""

    def __init__(self, mode: str = "exact", max_entries: int = 10_000, ttl_seconds: float = 3600.0,
                 threshold: float = DEFAULT_SEMANTIC_THRESHOLD):
        if mode not in MODES:
            raise ValueError(f"response cache mode must be one of {', '.join(MODES)}, not {mode!r}")
        self.mode, self.max_entries, self.ttl, self.threshold = mode, max_entries, ttl_seconds, threshold
        self._exact: OrderedDict[str, Entry] = OrderedDict()  # key -> entry, least recently used first
        self._scopes: dict[str, list[str]] = {}  # semantic scope -> exact keys in it
        self._lock = threading.Lock()
        self.saved_joules = 0.0

    def __len__(self) -> int:
        return len(self._exact)

    @staticmethod
    def keys(fields: dict, tenant: str) -> tuple[str, str, str | None]:
        """(exact key, semantic scope, the last user turn's text or None) of a request's fields."""
        fields = {k: v for k, v in fields.items() if k not in UNKEYED}
        history, last = split_last_user_turn(fields.get("messages") or [])
        return (digest({"tenant": tenant, **fields}),
                digest({"tenant": tenant, **fields, "messages": history}), last)

    def _valid(self, entry: Entry, adapter) -> bool:
        if time.monotonic() - entry.created > self.ttl:
            return False
        return (entry.adapter is None and adapter is None) or (
            entry.adapter is not None and adapter is not None and entry.adapter() is adapter)

    def get_exact(self, key: str, adapter) -> Hit | None:
        with self._lock:
            entry = self._exact.get(key)
            if entry is None:
                return None
            if not self._valid(entry, adapter):
                self._drop(key)
                return None
            self._exact.move_to_end(key)
            self.saved_joules += entry.joules
            return Hit(entry.body, "exact", 1.0, entry.joules)

    def get_semantic(self, scope: str, vector: np.ndarray, adapter, threshold: float | None = None) -> Hit | None:
        threshold = self.threshold if threshold is None else threshold
        with self._lock:
            best, best_key = -1.0, None
            for key in list(self._scopes.get(scope, ())):
                entry = self._exact[key]
                if not self._valid(entry, adapter):
                    self._drop(key)
                    continue
                similarity = float(np.dot(entry.vector, vector))
                if similarity > best:
                    best, best_key = similarity, key
            if best_key is None or best < threshold:
                return None
            entry = self._exact[best_key]
            self._exact.move_to_end(best_key)
            self.saved_joules += entry.joules
            return Hit(entry.body, "semantic", round(best, 4), entry.joules)

    def put(self, key: str, entry: Entry) -> None:
        with self._lock:
            if key in self._exact:
                self._drop(key)
            self._exact[key] = entry
            if entry.vector is not None:
                self._scopes.setdefault(entry.scope, []).append(key)
            while len(self._exact) > self.max_entries:
                self._drop(next(iter(self._exact)))

    def clear(self) -> None:
        with self._lock:
            self._exact.clear()
            self._scopes.clear()

    def _drop(self, key: str) -> None:
        entry = self._exact.pop(key)
        if entry.vector is not None:
            keys = self._scopes.get(entry.scope, [])
            if key in keys:
                keys.remove(key)
            if not keys:
                self._scopes.pop(entry.scope, None)
