"""Chat completions with a prompt template: leanserve's `prompt` extension field.

    {"model": ..., "messages": [...], "prompt": {"id": "greet", "version": "production", "variables": {...}}}

The template's messages go first, then the request's own; the template's settings
(temperature, max_tokens, response_format, tools, ...) are defaults for the fields the
request does not set. The merged request is parsed again as if the client had sent it, so
it meets every check a plain request meets. The prompt directory is re-scanned when its
listing (names, mtimes, sizes) changed since the last request that used a prompt.

The prompt used is kept in a context variable of the request's task, so the usage log
(written as each sequence finishes, also in a stream) and the response body can name it.
"""
from __future__ import annotations

import json
from contextvars import ContextVar

from . import protocol as p

USED: ContextVar[tuple[str, str] | None] = ContextVar("leanserve_prompt_used", default=None)


def apply(library, req: p.ChatCompletionRequest) -> p.ChatCompletionRequest:
    """`req` with its prompt rendered in (unchanged without one); a 400 for an unknown prompt,
    version or label, or bad variables."""
    if req.prompt is None:
        return req
    if library is None:
        raise p.APIError(400, "This server has no prompt templates (start it with --prompts DIR)", param="prompt")
    library.reload_if_changed()
    rendered = library.render(req.prompt.id, req.prompt.version, req.prompt.variables)  # InvalidRequest: 400
    body = req.model_dump(mode="json", by_alias=True, exclude_unset=True)
    body = {**rendered.settings, **body, "messages": rendered.messages + body["messages"]}
    USED.set((rendered.prompt_id, rendered.version))
    return p.parse_body(p.ChatCompletionRequest, json.dumps(body).encode())


def used_label() -> str | None:
    """"id@version" of the prompt this request used, for the usage log."""
    used = USED.get()
    return None if used is None else f"{used[0]}@{used[1]}"


def annotate(body: dict) -> dict:
    """The response body with the prompt it used in the `leanserve` extension field."""
    used = USED.get()
    if used is not None:
        body["leanserve"] = {"prompt": {"id": used[0], "version": used[1]}}
    return body
