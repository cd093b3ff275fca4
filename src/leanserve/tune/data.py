"""Training files: OpenAI's chat-format JSONL, checked line by line, rendered as the server renders.

A line is `{"messages": [...], "tools": [...]?}`; roles system, user, assistant (and tool);
an assistant message may say `"weight": 0` (not trained on) or 1. Bad lines are reported
with their 1-based numbers, as OpenAI reports them.

Rendering uses the model's own chat template through `Tokenizer.apply_chat_template`, the
call the server makes for /v1/chat/completions (serve/app.py `chat_prompt_ids`), so an
adapter learns the exact prompt it will be served under: the tokens before an assistant
message are `encode(template(messages before it, add_generation_prompt=True))`, what the
server feeds the model. The loss mask covers the assistant message's tokens up to and
including the template's end-of-turn token (so the model learns to stop), nothing else.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field

ROLES = ("system", "user", "assistant", "tool")
MAX_ERRORS = 10  # lines reported per file, as OpenAI does not list them all


@dataclass
class Example:
    messages: list[dict]
    tools: list | None = None
    line: int = 0


@dataclass
class Rendered:
    """One example as token ids and a mask: mask[i] = 1 when token i is trained on."""

    ids: list[int]
    mask: list[int]
    line: int = 0

    @property
    def trained(self) -> int:
        return sum(self.mask)


class FileError(ValueError):
    """A training file that cannot be used; `lines` holds (line number, message)."""

    def __init__(self, message: str, lines: list[tuple[int, str]] | None = None):
        super().__init__(message)
        self.message = message
        self.lines = lines or []


def _check_line(number: int, text: str) -> tuple[Example | None, str | None]:
    try:
        obj = json.loads(text)
    except ValueError as e:
        return None, f"is not valid JSON ({e.msg})"
    if not isinstance(obj, dict):
        return None, "is not a JSON object"
    messages = obj.get("messages")
    if not isinstance(messages, list) or not messages:
        return None, "has no 'messages' list"
    extra = set(obj) - {"messages", "tools", "parallel_tool_calls", "functions"}
    if extra:
        return None, f"has unknown keys {sorted(extra)}"
    assistants = 0
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            return None, f"messages[{i}] is not an object"
        role = m.get("role")
        if role not in ROLES:
            return None, f"messages[{i}] has role {role!r}; expected one of {', '.join(ROLES)}"
        content = m.get("content")
        if content is not None and not isinstance(content, str):
            return None, f"messages[{i}].content must be a string"
        if content is None and not m.get("tool_calls"):
            return None, f"messages[{i}] has no content"
        if "weight" in m:
            if role != "assistant":
                return None, f"messages[{i}]: 'weight' is only allowed on assistant messages"
            if m["weight"] not in (0, 1) or isinstance(m["weight"], bool):
                return None, f"messages[{i}].weight must be 0 or 1"
        assistants += role == "assistant" and m.get("weight", 1) == 1
    if not assistants:
        return None, "has no assistant message to train on"
    tools = obj.get("tools")
    if tools is not None and not isinstance(tools, list):
        return None, "'tools' must be a list"
    return Example(messages, tools, number), None


def parse_jsonl(data: bytes | str, min_examples: int = 1) -> list[Example]:
    """Every example of a file, or FileError naming the bad lines (blank lines are skipped)."""
    if isinstance(data, bytes):
        try:
            data = data.decode("utf-8")
        except UnicodeDecodeError as e:
            raise FileError(f"The file is not UTF-8 text (byte {e.start}).") from None
    examples, bad = [], []
    for number, text in enumerate(data.splitlines(), 1):
        if not text.strip():
            continue
        example, error = _check_line(number, text)
        if error:
            bad.append((number, f"Line {number} {error}."))
        else:
            examples.append(example)
    if bad:
        shown = "; ".join(m for _, m in bad[:MAX_ERRORS])
        more = f" (and {len(bad) - MAX_ERRORS} more bad lines)" if len(bad) > MAX_ERRORS else ""
        raise FileError(f"Invalid file format: {len(bad)} bad line(s): {shown}{more}", bad)
    if len(examples) < min_examples:
        raise FileError(f"The file has {len(examples)} example(s); at least {min_examples} are needed.")
    return examples


def _clean(message: dict) -> dict:
    return {k: v for k, v in message.items() if k != "weight"}


def render(tokenizer, example: Example) -> Rendered:
    """Token ids and loss mask of one example under the model's chat template."""
    messages = [_clean(m) for m in example.messages]
    extra = {"tools": example.tools} if example.tools else {}
    full = tokenizer.apply_chat_template(messages, add_generation_prompt=False, **extra)
    cuts, spans = [0], []
    for i, m in enumerate(example.messages):
        if m["role"] != "assistant":
            continue
        start = len(tokenizer.apply_chat_template(messages[:i], add_generation_prompt=True, **extra))
        end_text = tokenizer.apply_chat_template(messages[:i + 1], add_generation_prompt=False, **extra)
        if not full.startswith(end_text) or start > len(end_text):
            raise FileError(f"Line {example.line}: the chat template does not render messages as a prefix of "
                            "the conversation; this model cannot be trained on multi-turn examples", [])
        end = len(end_text.rstrip())  # the end-of-turn token, not the newline after it
        if start < cuts[-1]:
            raise FileError(f"Line {example.line}: the chat template rewrites earlier turns", [])
        cuts += [start, end]
        spans.append(m.get("weight", 1) == 1)
    cuts.append(len(full))
    ids, mask = [], []
    for k in range(len(cuts) - 1):
        piece = tokenizer.encode(full[cuts[k]:cuts[k + 1]], add_special_tokens=False) if cuts[k + 1] > cuts[k] else []
        trained = k % 2 == 1 and spans[k // 2]
        ids += piece
        mask += [int(trained)] * len(piece)
    return Rendered(ids, mask, example.line)


@dataclass
class Dataset:
    rows: list[Rendered] = field(default_factory=list)

    @classmethod
    def of(cls, tokenizer, examples: list[Example], max_len: int) -> "Dataset":
        rows = []
        for ex in examples:
            r = render(tokenizer, ex)
            if len(r.ids) > max_len:  # OpenAI truncates too; keep the start, where the prompt is
                r = Rendered(r.ids[:max_len], r.mask[:max_len], r.line)
            if r.trained:
                rows.append(r)
        if not rows:
            raise FileError("No example has an assistant token to train on after rendering.")
        return cls(rows)

    @property
    def tokens(self) -> int:
        return sum(len(r.ids) for r in self.rows)
