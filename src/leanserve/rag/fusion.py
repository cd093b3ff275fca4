"""Hybrid ranking: a vector ranking and a full-text ranking fused by weighted reciprocal rank,
as OpenAI's `ranking_options.hybrid_search` describes.

A chunk scores sum(weight / (60 + rank)) over the rankings it is in (rank from 1), divided
by what a chunk first in both would score, so fused scores lie in [0, 1] like cosines and
`score_threshold` (0 to 1) means the same on either kind of search.
"""
from __future__ import annotations

RRF_K = 60  # the usual reciprocal-rank constant (Cormack et al., 2009)
CANDIDATES = 100  # depth of each ranking fused


def fuse(vector_ids: list, text_ids: list, embedding_weight: float, text_weight: float) -> list[tuple[object, float]]:
    """(id, fused score) best first; ties keep the vector ranking's order. A ranking of
    weight 0 adds nothing, not even its candidates (text_weight 1, embedding_weight 0 is a
    full-text search)."""
    best = (embedding_weight + text_weight) / (RRF_K + 1)
    if best <= 0:
        return []
    scores: dict = {}
    for weight, ids in ((embedding_weight, vector_ids), (text_weight, text_ids)):
        if weight <= 0:
            continue
        for rank, item in enumerate(ids, 1):
            scores[item] = scores.get(item, 0.0) + weight / (RRF_K + rank)
    return sorted(((item, s / best) for item, s in scores.items()), key=lambda p: -p[1])
