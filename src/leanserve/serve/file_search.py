"""The `file_search` tool of `/v1/responses`: search the vector stores, put what was found
in the prompt, cite the files the answer used.

- **The query** is the text of the conversation's last user message, as the client wrote
  it. The model does not rewrite it: a 135M model's rewrite is more often worse than the
  question, and it would cost a generation before the answer. The response's
  `file_search_call.queries` holds that one query.
- **The search** is the vector stores API's (rag/backend.py): each store of
  `vector_store_ids` searched with the tool's `filters`, `max_num_results` (default 10)
  and `ranking_options`; the hits of several stores merged by score.
- **The context**: the hits best first, each as its filename and text, go before the
  question in that last user message (every chat template takes that; a system message in
  mid-conversation is refused by some), within `context_budget` tokens of the serving
  model: whole chunks while the next fits, the first one cut to the budget if it alone is
  larger. The stored input items keep the message as the client sent it.
- **Citations**: the 135M model does not write citation markers reliably, so none are
  asked for. A sentence of the answer cites the context chunk it repeats a phrase of (two
  consecutive words, not both stopwords; most shared phrases wins, then rank), as a
  `file_citation` annotation at the sentence's end; consecutive sentences citing one file
  share one. An answer that repeats nothing from the files cites nothing.
"""
from __future__ import annotations

import asyncio
import re
import uuid
from dataclasses import dataclass, field

from pydantic import Field, ValidationError

from ..errors import InvalidRequest
from ..rag import filters as rag_filters
from ..rag.backend import SearchHit
from . import protocol as p
from .protocol import APIError
from .vector_stores import RankingOptions

CONTEXT_TOKENS = 1024  # at most this many prompt tokens of retrieved text (and a quarter of the context)
HEADER = "Answer the question using these excerpts from files."
STOPWORDS = frozenset(
    "a an and are as at be been but by can do does for from has have how i if in into is it its my no not of on or "
    "our so than that the their then there these they this to was we were what when where which who why will with "
    "you your".split())


class FileSearchTool(p._Strict):
    type: str
    vector_store_ids: list[str] = Field(min_length=1, max_length=16)
    filters: dict | None = None
    max_num_results: int = Field(10, ge=1, le=50)
    ranking_options: RankingOptions | None = None


@dataclass
class Found:
    """One search: its query, every hit (the results) and those put in the context."""

    query: str
    hits: list[SearchHit]
    used: list[SearchHit] = field(default_factory=list)
    context: str = ""


def parse(tools: list[dict] | None) -> tuple[FileSearchTool | None, list[dict] | None, int | None]:
    """(the file_search tool, the other tools, its index in `tools`); a 400 for a bad one."""
    if not tools:
        return None, tools, None
    found = [i for i, t in enumerate(tools) if isinstance(t, dict) and t.get("type") == "file_search"]
    if not found:
        return None, tools, None
    if len(found) > 1:
        raise APIError(400, "Only one 'file_search' tool may be given", param=f"tools[{found[1]}]")
    i = found[0]
    try:
        tool = FileSearchTool.model_validate(tools[i])
    except ValidationError as e:
        error = p.validation_error(e)
        raise APIError(400, error.message, param=f"tools[{i}].{error.param}" if error.param else f"tools[{i}]") \
            from None
    if tool.filters is not None:
        try:
            rag_filters.validate(tool.filters, f"tools[{i}].filters")
        except InvalidRequest as e:
            raise APIError(400, e.message, param=e.param or f"tools[{i}].filters") from None
    hybrid = tool.ranking_options.hybrid_search if tool.ranking_options else None
    if hybrid is not None and hybrid.embedding_weight + hybrid.text_weight == 0:
        raise APIError(400, "hybrid_search weights must not both be 0",
                       param=f"tools[{i}].ranking_options.hybrid_search")
    return tool, [t for j, t in enumerate(tools) if j != i] or None, i


async def check_stores(api, tool: FileSearchTool, index: int) -> None:
    """404 for a store that does not exist, 400 for an expired one (before anything runs)."""
    if api is None:
        raise APIError(400, "This server has no vector stores (it was started without an embedding model), so it "
                       "cannot run 'file_search'", param=f"tools[{index}].type", code="unsupported_tool_type")
    for j, store_id in enumerate(tool.vector_store_ids):
        row = await asyncio.to_thread(api.backend.get_store, store_id)
        param = f"tools[{index}].vector_store_ids[{j}]"
        if row is None:
            raise APIError(404, f"Vector store with id '{store_id}' not found.", param=param, code="not_found")
        if row["status"] == "expired":
            raise APIError(400, f"Vector store {store_id} has expired", param=param, code="expired")


def last_user(messages: list) -> int | None:
    """Index of the last user message (protocol.ChatMessage) with text, or None."""
    for i in range(len(messages) - 1, -1, -1):
        if messages[i].role == "user" and messages[i].content.strip():
            return i
    return None


async def search(api, tool: FileSearchTool, query: str) -> list[SearchHit]:
    """The best `max_num_results` hits over the tool's stores, best first."""
    ranking = tool.ranking_options or RankingOptions()
    hybrid = ranking.hybrid_search
    vector = await api.embed_query(query)
    hits: list[SearchHit] = []
    for store_id in tool.vector_store_ids:
        hits += await asyncio.to_thread(
            api.backend.search, store_id, vector, query, tool.max_num_results, tool.filters, ranking.score_threshold,
            (hybrid.embedding_weight, hybrid.text_weight) if hybrid else None)
        await asyncio.to_thread(api.backend.touch_store, store_id)
    return sorted(hits, key=lambda h: -h.score)[:tool.max_num_results]


def build_context(found: Found, tokenizer, budget: int) -> Found:
    """Fills `found.used` and `found.context`: the hits that fit in `budget` tokens."""
    pieces, used = [HEADER], []
    left = budget - len(tokenizer.encode(HEADER + "\n\n", add_special_tokens=False))
    for hit in found.hits:
        piece = f"[{hit.filename}]\n{hit.text.strip()}"
        ids = tokenizer.encode(piece + "\n\n", add_special_tokens=False)
        if len(ids) > left:
            if used or left <= 16:
                break
            piece = tokenizer.decode(ids[:left])  # the best hit alone is too long: its start
            ids = ids[:left]
        pieces.append(piece)
        used.append(hit)
        left -= len(ids)
    found.used = used
    found.context = "\n\n".join(pieces) if used else ""
    return found


def with_context(chat: p.ChatCompletionRequest, index: int, found: Found) -> p.ChatCompletionRequest:
    """The chat request with the context before the question in message `index`."""
    if not found.context:
        return chat
    messages = list(chat.messages)
    question = messages[index].content
    messages[index] = messages[index].model_copy(update={"content": f"{found.context}\n\nQuestion: {question}"})
    return chat.model_copy(update={"messages": messages})


def call_item(item_id: str, found: Found | None, status: str, results: bool) -> dict:
    item = {"id": item_id, "type": "file_search_call", "status": status,
            "queries": [found.query] if found else [], "results": None}
    if results and found is not None and status == "completed":
        item["results"] = [{"file_id": h.file_id, "filename": h.filename, "score": round(h.score, 6),
                            "attributes": h.attributes, "text": h.text} for h in found.hits]
    return item


def new_call_id() -> str:
    return f"fs_{uuid.uuid4().hex}"


def _phrases(text: str) -> set[tuple[str, str]]:
    words = re.findall(r"\w+", text.lower())
    return {(a, b) for a, b in zip(words, words[1:]) if not (a in STOPWORDS and b in STOPWORDS)}


def citations(text: str, used: list[SearchHit]) -> list[dict]:
    """`file_citation` annotations of `text` for the chunks of `used` it repeats phrases of."""
    chunks = [_phrases(h.text) for h in used]
    out: list[dict] = []
    for sentence in re.finditer(r"[^.!?\n]+[.!?]*", text):
        said = _phrases(sentence.group())
        best, best_score = None, 0
        for hit, phrases in zip(used, chunks):
            score = len(said & phrases)
            if score > best_score:  # ties: the better ranked chunk, first in `used`
                best, best_score = hit, score
        if best is None:
            continue
        end = sentence.end()
        while end > sentence.start() and text[end - 1].isspace():
            end -= 1
        if out and out[-1]["file_id"] == best.file_id:
            out[-1]["index"] = end  # one citation for a run of sentences from one file
        else:
            out.append({"type": "file_citation", "file_id": best.file_id, "filename": best.filename, "index": end})
    return out
