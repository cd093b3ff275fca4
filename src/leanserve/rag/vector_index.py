"""In-memory search over each store's vectors, kept in step with SQLite, which stays the truth.

Measured on this machine (2 cores shared with other work, load 5-7; 384-d clustered
vectors; medians): sqlite-vec's vec0 table answers a k-NN over 10k rows in 7-19 ms and
`vec_distance_cosine` over BLOBs in 13-36 ms, while a float32 matrix in memory (one numpy
product) takes 0.4 ms at 10k and 14-34 ms at 100k. So a store's vectors are loaded from
SQLite once (0.7 s for 100k), kept as one matrix per file, and searched exactly; past
`ann_threshold` chunks (20k: a few ms exact) an HNSW graph (usearch, float16, ef_search
128: 0.57 ms p50 at 100k through SQLiteBackend.search, recall@10 0.998) answers instead,
its hits rescored exactly. The graph is built (35 s for 100k on one core) in a
background thread, from the loaded vectors: exact search answers meanwhile, and a graph
is never written to disk (after a restart it is rebuilt from the SQLite rows).

Every store row in SQLite has a `version`, bumped by each transaction that changes its
chunks. The backend passes each change here with its new version (`apply`); a search
passes the version it read, and a store whose copy is behind is reloaded. So a change
made by another process, or one this copy missed, costs a reload, never a stale answer.
With a filter the graph is asked for more neighbours than k (as many more as the filter
is selective) and the misses dropped; when too few pass, or when the filter leaves fewer
rows than `ann_threshold`, the search is exact over the passing files' rows.
"""
from __future__ import annotations

import threading
from typing import Callable

import numpy as np

ANN_THRESHOLD = 20_000  # chunks in a store past which the HNSW graph answers
Hit = tuple[int, str, float]  # (chunk id, file id, cosine)
Loader = Callable[[str], tuple[int, dict[str, tuple[np.ndarray, np.ndarray]]]]


class StoreVectors:
    """One store's vectors: per file, its chunk ids (int64 [n]) and vectors (float32 [n, dim])."""

    def __init__(self, dim: int, version: int, files: dict[str, tuple[np.ndarray, np.ndarray]]):
        self.dim, self.version, self.files = dim, version, files
        self.lock = threading.Lock()
        self.ann = None  # usearch Index over chunk ids, once built
        self.building: threading.Thread | None = None
        self.removed = 0  # rows removed from the graph since it was built (HNSW keeps them as tombstones)
        self._flat: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None  # ids, file index, matrix
        self._where = {int(c): (f, row) for f, (ids, _) in files.items() for row, c in enumerate(ids)}

    @property
    def size(self) -> int:
        return len(self._where)

    def set_file(self, file_id: str, ids: np.ndarray | None, vectors: np.ndarray | None) -> None:
        """Replaces (or with None removes) one file's rows, in the graph too."""
        old = self.files.pop(file_id, None)
        if old is not None:
            for c in old[0]:
                del self._where[int(c)]
            if self.ann is not None:
                self.ann.remove(old[0])
                self.removed += len(old[0])
        if ids is not None and len(ids):
            self.files[file_id] = (ids, vectors)
            self._where.update((int(c), (file_id, row)) for row, c in enumerate(ids))
            if self.ann is not None:
                self.ann.add(ids, vectors, threads=1)
        if self.ann is not None and self.removed > self.size // 2:  # mostly tombstones: build afresh
            self.ann, self.removed = None, 0
        self._flat = None

    def exact(self, q: np.ndarray, k: int, allowed: set[str] | None) -> list[Hit]:
        if allowed is None:
            if self._flat is None:
                self._flat = self._stack(list(self.files))
            ids, owner, matrix, names = *self._flat, list(self.files)
        else:
            names = [f for f in allowed if f in self.files]
            ids, owner, matrix = self._stack(names)
        if not len(ids):
            return []
        scores = matrix @ q
        top = np.argpartition(-scores, k - 1)[:k] if len(scores) > k else np.arange(len(scores))
        top = top[np.argsort(-scores[top], kind="stable")]
        return [(int(ids[i]), names[owner[i]], float(scores[i])) for i in top]

    def _stack(self, names: list[str]):
        if not names:
            return np.empty(0, np.int64), np.empty(0, np.int32), np.empty((0, self.dim), np.float32)
        blocks = [self.files[f] for f in names]
        owner = np.concatenate([np.full(len(b[0]), i, np.int32) for i, b in enumerate(blocks)])
        return np.concatenate([b[0] for b in blocks]), owner, np.concatenate([b[1] for b in blocks])

    def approximate(self, q: np.ndarray, k: int, allowed: set[str] | None) -> list[Hit]:
        """The graph's k nearest, rescored exactly, those of files not `allowed` dropped."""
        self.ann.expansion_search = max(128, 2 * k)
        found = self.ann.search(q, k, threads=1)
        hits = []
        for c in found.keys.tolist():
            f, row = self._where.get(int(c), (None, 0))
            if f is not None and (allowed is None or f in allowed):
                hits.append((int(c), f, float(self.files[f][1][row] @ q)))
        hits.sort(key=lambda h: -h[2])
        return hits

    def snapshot(self) -> tuple[np.ndarray, np.ndarray]:
        ids, _, matrix = self._flat if self._flat is not None else self._stack(list(self.files))
        return ids, matrix


class VectorIndex:
    """Every store's `StoreVectors`, loaded on first search by `load(store_id)` ->
    (version, {file_id: (ids, vectors)})."""

    def __init__(self, dim: int, load: Loader, ann_threshold: int = ANN_THRESHOLD):
        self.dim, self.load, self.ann_threshold = dim, load, ann_threshold
        self._stores: dict[str, StoreVectors] = {}
        self._lock = threading.Lock()

    def search(self, store_id: str, version: int, q: np.ndarray, k: int,
               allowed: set[str] | None = None, passing: int | None = None) -> list[Hit]:
        """The k best (chunk id, file id, cosine) of the store's files (of `allowed` ones
        only, `passing` rows in all, when given), best first."""
        sv = self._current(store_id, version)
        with sv.lock:
            if sv.size > self.ann_threshold and sv.ann is None and sv.building is None:
                sv.building = threading.Thread(target=self._build, args=(sv,), daemon=True,
                                               name=f"ann-{store_id}")
                sv.building.start()
            if sv.ann is None or not sv.size:
                return sv.exact(q, k, allowed)
            if allowed is None:
                return sv.approximate(q, k, None)
            rows = passing if passing is not None else sum(len(sv.files[f][0]) for f in allowed if f in sv.files)
            if rows <= self.ann_threshold:
                return sv.exact(q, k, allowed)
            wanted = min(sv.size, int(2 * k * sv.size / rows) + k)
            hits = sv.approximate(q, wanted, allowed)
            return hits[:k] if len(hits) >= k else sv.exact(q, k, allowed)

    def apply(self, store_id: str, version: int, file_id: str, ids: np.ndarray | None = None,
              vectors: np.ndarray | None = None) -> None:
        """A committed change: `file_id`'s rows are now `ids`/`vectors` (None: gone), at `version`."""
        with self._lock:
            sv = self._stores.get(store_id)
        if sv is None:
            return
        with sv.lock:
            if sv.version == version - 1:
                sv.set_file(file_id, ids, vectors)
                sv.version = version
                return
            if sv.version >= version:
                return
        self.drop(store_id)  # this copy missed a change: reload on the next search

    def drop(self, store_id: str) -> None:
        with self._lock:
            self._stores.pop(store_id, None)

    def settle(self) -> None:
        """Waits for the graphs being built (tests, benchmarks)."""
        with self._lock:
            threads = [sv.building for sv in self._stores.values() if sv.building is not None]
        for t in threads:
            t.join()

    def _current(self, store_id: str, version: int) -> StoreVectors:
        with self._lock:
            sv = self._stores.get(store_id)
        if sv is not None and sv.version >= version:
            return sv
        loaded_version, files = self.load(store_id)
        fresh = StoreVectors(self.dim, loaded_version, files)
        with self._lock:
            sv = self._stores.get(store_id)
            if sv is None or sv.version < loaded_version:
                self._stores[store_id] = sv = fresh
        return sv

    def _build(self, sv: StoreVectors) -> None:
        """Builds the graph from a copy of the rows, then catches up with what changed meanwhile."""
        from usearch.index import Index

        with sv.lock:
            ids, matrix = sv.snapshot()
        graph = Index(ndim=self.dim, metric="cos", dtype="f16", connectivity=16, expansion_add=128)
        graph.add(ids, matrix, threads=1)
        with sv.lock:
            built = set(ids.tolist())
            now = set(sv._where)
            gone = np.fromiter(built - now, np.int64)
            if len(gone):
                graph.remove(gone)
            for f, (fids, vectors) in sv.files.items():
                new = [row for row, c in enumerate(fids.tolist()) if c not in built]
                if new:
                    graph.add(fids[new], vectors[new], threads=1)
            sv.ann, sv.building = graph, None
