"""Cutting a file's text into chunks by the embedding model's tokens, as OpenAI's
`chunking_strategy` says: `auto` (800 tokens, 400 of overlap) or `static` (100-4096
tokens, overlap at most half).

A chunk's text is an exact substring of the file's text: boundaries come from the
tokenizer's character offsets, never from decoding ids (which would lowercase and respace
them for a BERT vocabulary).

Chunks may be longer than the embedding model takes (all-MiniLM-L6-v2: 256 tokens with
[CLS] and [SEP]; `auto` chunks are 800). Such a chunk is embedded whole, in pieces: its
tokens are split into the fewest equal windows that fit (800 -> 4 windows of 200), each
window is embedded with the model's special tokens, and the chunk's vector is the mean of
the windows' vectors weighted by their token counts, L2-normalised (the way OpenAI's
cookbook embeds texts longer than the model's context). Every token of every chunk thus
counts towards its vector; truncating instead would leave 146 of every 400 tokens of an
`auto`-chunked file in no vector at all.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import InvalidRequest

AUTO = {"max_chunk_size_tokens": 800, "chunk_overlap_tokens": 400}
MIN_CHUNK, MAX_CHUNK = 100, 4096


def validate_chunking(strategy) -> dict:
    """The strategy as a file row keeps it (`auto` written out as OpenAI reports it):
    {"type": "static", "static": {"max_chunk_size_tokens", "chunk_overlap_tokens"}}.
    InvalidRequest's param is relative to the strategy (e.g. `static.chunk_overlap_tokens`)."""
    if strategy is None:
        return {"type": "static", "static": dict(AUTO)}
    if not isinstance(strategy, dict):
        raise InvalidRequest("'chunking_strategy' must be an object", None)
    kind = strategy.get("type")
    if kind == "auto":
        if set(strategy) != {"type"}:
            raise InvalidRequest("An 'auto' chunking strategy takes no other fields", None)
        return {"type": "static", "static": dict(AUTO)}
    if kind != "static":
        raise InvalidRequest(f"chunking_strategy 'type' must be 'auto' or 'static'; got {kind!r}", "type")
    if set(strategy) != {"type", "static"}:
        raise InvalidRequest("A 'static' chunking strategy takes exactly 'type' and 'static'", "static")
    static = strategy["static"]
    if not isinstance(static, dict) or set(static) != {"max_chunk_size_tokens", "chunk_overlap_tokens"}:
        raise InvalidRequest("'static' must give max_chunk_size_tokens and chunk_overlap_tokens", "static")
    size, overlap = static["max_chunk_size_tokens"], static["chunk_overlap_tokens"]
    if not _int(size) or not MIN_CHUNK <= size <= MAX_CHUNK:
        raise InvalidRequest(f"max_chunk_size_tokens must be an integer from {MIN_CHUNK} to {MAX_CHUNK}",
                             "static.max_chunk_size_tokens")
    if not _int(overlap) or not 0 <= overlap <= size // 2:
        raise InvalidRequest(f"chunk_overlap_tokens must be an integer from 0 to half of max_chunk_size_tokens "
                             f"({size // 2})", "static.chunk_overlap_tokens")
    return {"type": "static", "static": {"max_chunk_size_tokens": size, "chunk_overlap_tokens": overlap}}


def _int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


@dataclass
class Piece:
    """One chunk: its text, its token count, and the token-id windows that embed it (each
    with the model's special tokens, each at most `max_embed_tokens` long)."""

    text: str
    tokens: int
    windows: list[list[int]]


def chunk_text(text: str, tokenizer, max_tokens: int, overlap: int, max_embed_tokens: int) -> list[Piece]:
    """Chunks of `max_tokens` tokens of a `tokenizers.Tokenizer`, each starting
    `max_tokens - overlap` tokens after the previous one; the last ends at the text's end."""
    tokenizer = _untruncated(tokenizer)
    enc = tokenizer.encode(text, add_special_tokens=False)
    ids, offsets = enc.ids, enc.offsets
    head, tail = _special_tokens(tokenizer)
    width = max_embed_tokens - len(head) - len(tail)
    if width < 1:
        raise ValueError(f"max_embed_tokens={max_embed_tokens} leaves no room beside the special tokens")
    stride = max_tokens - overlap
    pieces = []
    for start in range(0, max(len(ids) - overlap, 1), stride):
        end = min(start + max_tokens, len(ids))
        if end <= start:
            break
        part = ids[start:end]
        n = -(-len(part) // width)  # the fewest windows that fit, as equal as can be
        cuts = [round(i * len(part) / n) for i in range(n + 1)]
        windows = [head + part[a:b] + tail for a, b in zip(cuts, cuts[1:])]
        pieces.append(Piece(text[offsets[start][0]:offsets[end - 1][1]], len(part), windows))
        if end == len(ids):
            break
    return pieces


def embedding_inputs(pieces: list[Piece]) -> list[list[int]]:
    """Every piece's windows in one list, for one embedding call."""
    return [w for p in pieces for w in p.windows]


def pool(pieces: list[Piece], vectors: np.ndarray) -> np.ndarray:
    """Each piece's vector from its windows' vectors (`vectors` embeds
    `embedding_inputs(pieces)`): their mean weighted by window length, L2-normalised.
    float32 [len(pieces), dim]."""
    vectors = np.asarray(vectors, dtype=np.float32)
    out = np.empty((len(pieces), vectors.shape[1]), dtype=np.float32)
    at = 0
    for i, p in enumerate(pieces):
        n = len(p.windows)
        v = np.array([len(w) for w in p.windows], dtype=np.float32) @ vectors[at:at + n]
        out[i] = v / max(float(np.linalg.norm(v)), 1e-12)
        at += n
    return out


def _untruncated(tokenizer):
    """The tokenizer without its truncation and padding (a copy: the caller's is shared)."""
    if tokenizer.truncation is None and tokenizer.padding is None:
        return tokenizer
    from tokenizers import Tokenizer

    copy = Tokenizer.from_str(tokenizer.to_str())
    copy.no_truncation()
    copy.no_padding()
    return copy


def _special_tokens(tokenizer) -> tuple[list[int], list[int]]:
    """The ids the tokenizer's template puts before and after a text ([CLS], [SEP])."""
    plain = tokenizer.encode("a", add_special_tokens=False).ids
    full = tokenizer.encode("a", add_special_tokens=True).ids
    for i in range(len(full) - len(plain) + 1):
        if full[i:i + len(plain)] == plain:
            return full[:i], full[i + len(plain):]
    return [], []
