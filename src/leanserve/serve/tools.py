"""Tool calling: tools into the prompt, a grammar for the calls, calls parsed back out.

A model whose chat template knows tools gets them from its template and answers in its own
format (Qwen2 / Hermes `<tool_call>` tags, Llama 3 JSON, Mistral `[TOOL_CALLS]`). A template
without tools (the built-in SmolLM2) gets the generic format: the tools described in the
system prompt, each call a JSON object `{"name": ..., "arguments": {...}}` in `<tool_call>`
tags (Hermes', which many small models have seen). Either way the calls are generated under
a grammar: with `tool_choice` "required" or a named function the answer is one or more
valid calls, with "auto" it is either text (that does not start a call) or calls, and the
arguments always validate against the function's `parameters`. "none" renders no tools.
"""
from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass

from ..engine.structured import Constraint, json_schema_lark
from ..errors import InvalidRequest


@dataclass(frozen=True)
class ToolFormat:
    name: str
    start: str  # once, before the calls
    call_open: str  # before each call
    call_close: str  # after each call
    sep: str  # between calls
    end: str  # once, after the calls
    args_key: str  # the key holding a call's arguments
    native: bool  # the chat template renders the tools itself

    @property
    def lead(self) -> str:
        """What every answer with calls starts with."""
        return (self.start + self.call_open) or "{"


HERMES = ToolFormat("hermes", "", "<tool_call>\n", "\n</tool_call>", "\n", "", "arguments", True)
LLAMA3 = ToolFormat("llama3_json", "", "", "", "; ", "", "parameters", True)
MISTRAL = ToolFormat("mistral", "[TOOL_CALLS][", "", "", ", ", "]", "arguments", True)
GENERIC = ToolFormat("generic", "", "<tool_call>\n", "\n</tool_call>", "\n", "", "arguments", False)


def tool_format(chat_template: str | None) -> ToolFormat:
    """The format the model's chat template speaks; GENERIC when it ignores `tools`."""
    template = chat_template or ""
    if not re.search(r"\btools\b", template):
        return GENERIC
    if "[TOOL_CALLS]" in template:
        return MISTRAL
    if "<tool_call>" in template:
        return HERMES
    if "<|python_tag|>" in template or "ipython" in template:
        return LLAMA3
    return HERMES


GENERIC_PROMPT = """You may call one or more functions to help with the user's request. The functions are \
described in JSON below:
<tools>
{tools}
</tools>
To call a function, answer with one JSON object per call, each inside <tool_call></tool_call> tags:
<tool_call>
{{"name": <function name>, "arguments": <its arguments as a JSON object>}}
</tool_call>"""


def render_messages(messages: list, tools: list | None, fmt: ToolFormat) -> tuple[list[dict], dict]:
    """The conversation as the chat template takes it, and extra template variables (`tools`
    for a template that knows them). `messages`: protocol.ChatMessage; `tools`: the function
    definitions (dicts) to offer, or None."""
    out: list[dict] = []
    for m in messages:
        msg = {"role": m.role, "content": m.content}
        if m.role == "assistant" and m.tool_calls:
            calls = [{"name": c.function.name, "arguments": _arguments(c.function.arguments)} for c in m.tool_calls]
            if fmt.native:
                msg["tool_calls"] = [{"id": c.id, "type": "function", "function": call}
                                     for c, call in zip(m.tool_calls, calls)]
            else:
                text = fmt.start + fmt.sep.join(fmt.call_open + json.dumps(call, ensure_ascii=False) + fmt.call_close
                                                for call in calls) + fmt.end
                msg["content"] = f"{m.content}\n{text}" if m.content else text
        elif m.role == "tool":
            if fmt.native:
                msg.update(tool_call_id=m.tool_call_id, name=m.name)
            else:
                msg = {"role": "user", "content": f"<tool_response>\n{m.content}\n</tool_response>"}
        out.append(msg)
    if not tools:
        return out, {}
    if fmt.native:
        return out, {"tools": [{"type": "function", "function": t} for t in tools]}
    described = GENERIC_PROMPT.format(tools="\n".join(json.dumps({"type": "function", "function": t},
                                                                 ensure_ascii=False) for t in tools))
    if out and out[0]["role"] in ("system", "developer"):
        out[0] = dict(out[0], content=f"{out[0]['content']}\n\n{described}")
    else:
        out.insert(0, {"role": "system", "content": described})
    return out, {}


def _arguments(text: str):
    """A past call's arguments as the template wants them: a dict (a string if not JSON)."""
    try:
        return json.loads(text)
    except ValueError:
        return text


def call_schema(tool: dict, fmt: ToolFormat) -> dict:
    """One call of `tool` as a JSON schema. The parameters' own `$ref`s ("#/$defs/X", as
    pydantic writes them) point into the parameters: they are rebased under `$defs/<name>`,
    where the parameters go, so they still resolve inside the bigger schema."""
    parameters = tool.get("parameters") or {"type": "object", "properties": {}}
    base = f"#/$defs/{tool['name']}"
    return {"type": "object", "properties": {"name": {"const": tool["name"]}, fmt.args_key: {"$ref": base}},
            "required": ["name", fmt.args_key], "additionalProperties": False,
            "$defs": {tool["name"]: _rebase(parameters, base)}}


def _rebase(node, base: str):
    if isinstance(node, dict):
        return {k: (base + v[1:] if k == "$ref" and isinstance(v, str) and v.startswith("#") else _rebase(v, base))
                for k, v in node.items()}
    if isinstance(node, list):
        return [_rebase(v, base) for v in node]
    return node


def _regex_literal(text: str) -> str:
    """`text` as an llguidance (Rust) regex: punctuation escaped, `<` and `>` left alone."""
    return "".join("\\n" if c == "\n" else "\\" + c if c in r"\.+*?()|[]{}^$#&-~/" else c for c in text)


def tool_constraint(tools: list[dict], fmt: ToolFormat, choice: str, parallel: bool,
                    text_lark: str | None = None) -> Constraint:
    """The grammar of an answer: `choice` is "auto", "required" or a function's name.
    `text_lark` (a Lark item, e.g. a `%json` block) replaces free text as the non-call answer."""
    offered = tools if choice in ("auto", "required") else [t for t in tools if t["name"] == choice]
    strict = all(t.get("strict") is not False for t in offered)
    schemas = [call_schema(t, fmt) for t in offered]
    if len(schemas) > 1:  # the definitions move to the root, where the rebased refs point
        defs = {k: v for sch in schemas for k, v in sch.pop("$defs").items()}
        call = json_schema_lark({"anyOf": schemas, "$defs": defs}, strict)
    else:
        call = json_schema_lark(schemas[0], strict)
    one = " ".join(json.dumps(s) for s in (fmt.call_open,) if s) + f" {call} " + \
        " ".join(json.dumps(s) for s in (fmt.call_close,) if s)
    rules = [f"call: {one.strip()}"]
    calls = f"call ({json.dumps(fmt.sep)} call)*" if parallel else "call"
    body = " ".join(x for x in (json.dumps(fmt.start) if fmt.start else "", calls, json.dumps(fmt.end) if fmt.end else "")
                    if x)
    rules.append(f"calls: {body}")
    if choice == "auto":
        if text_lark is None:
            rules.append(f"TEXT: /(.|\\n)+/ & ~/{_regex_literal(fmt.lead)}(.|\\n)*/")
            text_lark = "TEXT"
        rules.insert(0, f"start: {text_lark} | calls")
    else:
        rules.insert(0, "start: calls")
    return Constraint("grammar", "\n".join(rules), strict=strict, param="tools")


def new_call_id() -> str:
    return "call_" + uuid.uuid4().hex[:24]


@dataclass
class ParsedCall:
    name: str
    arguments: str | None  # the raw JSON text, once the call is complete
    partial: str = ""  # arguments text so far that is sure to stay (streaming)


def _call_at(text: str, pos: int, fmt: ToolFormat) -> tuple[ParsedCall | None, int]:
    """The call whose JSON starts at `pos` (whitespace allowed), and where it ends; a call
    still being written has arguments None; (None, pos) when there is none (yet)."""
    decoder = json.JSONDecoder()
    start = len(text) - len(text[pos:].lstrip())
    try:
        obj, end = decoder.raw_decode(text, start)
    except ValueError:
        m = re.compile(r'\{\s*"name"\s*:\s*"([^"\\]*)"\s*,\s*"' + fmt.args_key + r'"\s*:\s*').match(text, start)
        if m is None:
            return None, pos
        return ParsedCall(m.group(1), None, text[m.end():].rstrip().rstrip("}").rstrip()), len(text)
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or fmt.args_key not in obj:
        raise ValueError("not a call")
    return ParsedCall(obj["name"], _raw_arguments(text[start:end], obj[fmt.args_key], fmt)), end


def _raw_arguments(call_text: str, args, fmt: ToolFormat) -> str:
    """The arguments exactly as generated (so streamed pieces add up to them)."""
    key = f'"{fmt.args_key}"'
    for m in re.finditer(re.escape(key) + r"\s*:\s*", call_text):
        candidate = call_text[m.end():-1].rstrip()
        try:
            if json.loads(candidate) == args:
                return candidate
        except ValueError:
            continue
    return json.dumps(args, ensure_ascii=False)


def parse_calls(text: str, fmt: ToolFormat, complete: bool = True) -> list[ParsedCall] | None:
    """The calls in an answer, or None when it is text. With `complete` False (streaming) the
    last call may be partial."""
    pos = len(text) - len(text.lstrip())
    if not text.startswith(fmt.lead, pos) and not (fmt.lead == "{" and text.startswith("{", pos)):
        return None
    calls: list[ParsedCall] = []
    pos += len(fmt.start)
    try:
        while True:
            pos = _skip(text, pos, fmt.call_open)
            call, pos = _call_at(text, pos, fmt)
            if call is None:
                break
            calls.append(call)
            if call.arguments is None:
                break
            pos = _skip(text, pos, fmt.call_close)
            after = _skip(text, pos, fmt.sep)
            if after == pos and fmt.sep.strip():
                break
            pos = after
    except ValueError:
        return None
    if complete and (not calls or any(c.arguments is None for c in calls)):
        return None
    return calls


def _skip(text: str, pos: int, literal: str) -> int:
    """Past `literal` at `pos`, whitespace around it allowed; `pos` if it is not there."""
    if not literal:
        return pos
    stripped = len(text) - len(text[pos:].lstrip())
    if text.startswith(literal.strip(), stripped):
        return stripped + len(literal.strip())
    return pos


def message_calls(calls: list[ParsedCall]) -> list[dict]:
    return [{"id": new_call_id(), "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
            for c in calls]


class ToolStream:
    """Turns an answer's text deltas into OpenAI's streamed deltas: content while it is text,
    else per call a first delta (index, id, type, name, `arguments: ""`) and then pieces of
    its arguments. Text that could still open a call is held back until it is known."""

    def __init__(self, fmt: ToolFormat):
        self.fmt = fmt
        self.text = ""
        self.mode: str | None = None  # None (undecided), "content", "calls"
        self.ids: list[str] = []
        self.sent: list[int] = []  # argument characters sent, per call

    def feed(self, delta: str, final: bool = False) -> list[dict]:
        """The chat deltas to send for `delta` (`final`: the answer has ended)."""
        self.text += delta
        if self.mode is None:
            lead, head = self.fmt.lead, self.text.lstrip()
            if head.startswith(lead):
                self.mode = "calls"
            elif (lead.startswith(head) or not head) and not final:
                return []
            else:
                self.mode = "content"
                return [{"content": self.text}] if self.text else []
        if self.mode == "content":
            return [{"content": delta}] if delta else []
        calls = parse_calls(self.text, self.fmt, complete=False) or []
        out = []
        for i, call in enumerate(calls):
            if i == len(self.ids):
                self.ids.append(new_call_id())
                self.sent.append(0)
                out.append({"tool_calls": [{"index": i, "id": self.ids[i], "type": "function",
                                            "function": {"name": call.name, "arguments": ""}}]})
            args = call.arguments if call.arguments is not None else call.partial
            if len(args) > self.sent[i]:
                out.append({"tool_calls": [{"index": i, "function": {"arguments": args[self.sent[i]:]}}]})
                self.sent[i] = len(args)
        return out


@dataclass
class ChatPlan:
    """How one chat request is prompted and constrained. `fmt` is set when the answer is to be
    parsed for tool calls; `checks` are constraints to compile first, for their own errors."""

    messages: list[dict]
    template_vars: dict
    constraint: Constraint | None
    fmt: ToolFormat | None
    checks: list[Constraint]


def plan_chat(req, fmt: ToolFormat) -> ChatPlan:
    """`req`: a protocol.ChatCompletionRequest. Raises InvalidRequest for what cannot be served."""
    constraint = req.constraint()
    tools = [t.function.model_dump(exclude_none=True) for t in req.tools or []]
    choice = req.tool_choice
    if isinstance(choice, str) or choice is None:
        name = choice or ("auto" if tools else "none")
    else:
        name = choice.function.name
    if name != "none" and not tools:
        raise InvalidRequest("tool_choice needs 'tools'", "tool_choice")
    if name not in ("none", "auto", "required") and name not in {t["name"] for t in tools}:
        raise InvalidRequest(f"tool_choice names the function {name!r}, which is not among the tools", "tool_choice")
    if len({t["name"] for t in tools}) != len(tools):
        raise InvalidRequest("function names in 'tools' must be unique", "tools")
    offered = tools if name != "none" else None
    messages, template_vars = render_messages(req.messages, offered, fmt)
    if offered is None:
        return ChatPlan(messages, template_vars, constraint, None, [])
    checks = [Constraint("json", t["parameters"], strict=t.get("strict") is not False,
                         param=f"tools[{i}].function.parameters") for i, t in enumerate(tools) if "parameters" in t]
    text = None
    if constraint is not None:
        if constraint.kind not in ("json", "json_object"):
            raise InvalidRequest("tools combine with a JSON response_format only, not with a regex, choice or "
                                 "grammar", "structured_outputs")
        checks.append(constraint)
        text = json_schema_lark(constraint.value if constraint.kind == "json" else {"type": "object"},
                                constraint.strict)
    parallel = req.parallel_tool_calls and name in ("auto", "required")  # a named function: one call, as vLLM
    grammar = tool_constraint(tools, fmt, name, parallel, text)
    return ChatPlan(messages, template_vars, grammar, fmt, checks)


def answer(text: str, finish_reason: str | None, fmt: ToolFormat | None) -> tuple[str | None, list | None, str | None]:
    """(content, tool_calls, finish_reason) of one finished choice."""
    calls = parse_calls(text, fmt) if fmt is not None else None
    if not calls:
        return text, None, finish_reason
    return None, message_calls(calls), "tool_calls" if finish_reason == "stop" else finish_reason
