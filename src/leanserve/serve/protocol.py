"""The OpenAI wire format: request models (pydantic v2), response bodies, errors.

Requests are validated as strictly as OpenAI does: wrong JSON types and unknown top-level
fields are rejected. The sampling extensions vLLM users expect (top_k, min_p,
repetition_penalty, min_tokens, ignore_eos, stop_token_ids) are accepted too; their ranges are checked by
`SamplingParams`. Response bodies are plain dicts, all built here so their shapes sit in
one file.
"""
from __future__ import annotations

import math
import re
import time
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, PlainValidator, ValidationError, field_validator

from .. import jsonsafe
from ..energy.ledger import Bill
from ..engine.sequence import Logprob, RequestMetrics
from ..engine.structured import Constraint


class APIError(Exception):
    """Any failure the client should see: becomes `{"error": {...}}` with `status`."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type = status, message, type
        self.param, self.code, self.headers = param, code, headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def unparsable(reason) -> APIError:
    return APIError(400, f"We could not parse the JSON body of your request: {reason}")


def parse_body(model: type[BaseModel], body: bytes):
    """`model` from a client's JSON body: its nesting depth bounded first (jsonsafe; pydantic's
    parser would take any depth), then strict parsing; a 400 APIError either way."""
    try:
        jsonsafe.check_depth(body)
        return model.model_validate_json(body)
    except ValidationError as e:  # a ValueError too: first
        raise validation_error(e) from None
    except ValueError as e:
        raise unparsable(e) from None


def validation_error(exc: ValidationError) -> APIError:
    """The first problem pydantic found, named the way OpenAI names it (`messages[0].role`)."""
    err = exc.errors()[0]
    param = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in err["loc"]).lstrip(".") or None
    if err["type"] == "json_invalid":
        return unparsable(err["msg"])
    if err["type"] == "extra_forbidden":
        return APIError(400, f"Unrecognized request argument supplied: {param}", param=param)
    if err["type"] == "model_type" and param is None:
        return APIError(400, "The request body must be a JSON object")
    msg = str(err["ctx"]["error"]) if err["type"] == "value_error" else err["msg"]
    return APIError(400, f"Invalid '{param}': {msg}", param=param)


# -- requests -----------------------------------------------------------------------------

def _unsupported(value):
    if value:
        raise ValueError("not supported by this server")
    return value


def _text_content(value) -> str:
    """OpenAI's message content: a string, or a list of parts of which we take the text ones."""
    if value is None or isinstance(value, str):
        return value or ""
    if isinstance(value, list):
        texts = []
        for part in value:
            if not isinstance(part, dict) or not isinstance(part.get("type"), str):
                raise ValueError("each content part must be an object with a 'type'")
            if part["type"] != "text":
                raise ValueError(f"content parts of type {part['type']!r} are not supported; only 'text'")
            if not isinstance(part.get("text"), str):
                raise ValueError("a text content part needs a string 'text'")
            texts.append(part["text"])
        return "\n".join(texts)
    raise ValueError("must be a string or a list of content parts")


def _is_token_ids(value) -> bool:
    return (isinstance(value, list) and len(value) > 0
            and all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in value))


def _prompts(value) -> list[str | list[int]]:
    """A string, a list of strings, a list of token ids, or a list of token-id lists."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and value:
        if all(isinstance(p, str) for p in value):
            return value
        if _is_token_ids(value):
            return [value]
        if all(_is_token_ids(p) for p in value):
            return value
    raise ValueError("must be a string, a non-empty list of strings, a list of token ids "
                     "(non-negative integers) or a list of token-id lists")


MAX_STOPS = 16  # OpenAI takes 4; vLLM users send a few more


def _stop_list(value) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(s, str) for s in value):
        if len(value) > MAX_STOPS:
            raise ValueError(f"at most {MAX_STOPS} stop sequences, got {len(value)}")
        return value
    raise ValueError("must be a string or a list of strings")


Content = Annotated[str, PlainValidator(_text_content)]
Prompts = Annotated[list[str | list[int]], PlainValidator(_prompts)]
StopList = Annotated[list[str], PlainValidator(_stop_list)]
Unsupported = AfterValidator(_unsupported)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class StreamOptions(_Strict):
    include_usage: bool = False


class ToolCallFunction(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    name: str
    arguments: str = "{}"  # a JSON string, as the model wrote it


class ToolCall(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    id: str
    type: Literal["function"] = "function"
    function: ToolCallFunction


class ChatMessage(BaseModel):
    """One message. Other extra fields (refusal, audio, ...) are ignored, as chat templates do."""

    model_config = ConfigDict(extra="ignore", strict=True)
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Content = ""
    name: str | None = None
    tool_calls: list[ToolCall] | None = None  # assistant messages: the calls it made
    tool_call_id: str | None = None  # tool messages: the call this answers


FUNCTION_NAME = r"^[a-zA-Z0-9_-]{1,64}$"


class JSONSchemaFormat(_Strict):
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False, populate_by_name=True)
    name: str = Field(pattern=FUNCTION_NAME)
    description: str | None = None
    schema_: dict = Field(default_factory=lambda: {"type": "object"}, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None


class StructuredOutputs(_Strict):
    """vLLM's `structured_outputs` extension: exactly one of these."""

    json_: dict | str | None = Field(None, alias="json")
    regex: str | None = None
    choice: list[str] | None = Field(None, min_length=1, max_length=1024)
    grammar: str | None = None
    json_object: bool | None = None
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False, populate_by_name=True)


class FunctionDefinition(_Strict):
    name: str = Field(pattern=FUNCTION_NAME)
    description: str | None = None
    parameters: dict | None = None
    strict: bool | None = None


class Tool(_Strict):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(_Strict):
    name: str


class NamedToolChoice(_Strict):
    type: Literal["function"]
    function: NamedFunction


_DURATION = re.compile(r"(-?\d+(?:\.\d+)?)(h|m|s|ms)?")
_UNIT_SECONDS = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001, None: 1.0}


def _keep_alive(value) -> float:
    """Ollama's `keep_alive`: seconds as a number, or a duration like "5m", "1h30m", "10s";
    negative keeps the model loaded, 0 unloads it once idle."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ValueError("keep_alive must be a number of seconds or a duration such as \"5m\"")
    if not isinstance(value, str):
        seconds = float(value)
    else:
        parts = _DURATION.findall(value.strip())
        if not parts or "".join(n + (u or "") for n, u in parts) != value.strip():
            raise ValueError(f"keep_alive {value!r} is not a duration (e.g. \"5m\", \"1h30m\", \"10s\", \"-1\", 0)")
        seconds = sum(float(n) * _UNIT_SECONDS[u or None] for n, u in parts)
    if not math.isfinite(seconds):
        raise ValueError("keep_alive must be finite")
    return seconds


class GenerateRequest(_Strict):
    """Fields shared by chat and text completions."""

    model: str
    n: int = Field(1, ge=1, le=128)
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    seed: int | None = Field(None, ge=-(2**63), lt=2**63)
    stop: StopList = []
    user: str | None = None
    logit_bias: Annotated[dict | None, Unsupported] = None
    # extensions
    top_k: int | None = Field(None, ge=-1)  # its upper bound, the vocabulary, is the engine's to check
    min_p: float | None = None
    repetition_penalty: float | None = None
    min_tokens: int = Field(0, ge=0)
    ignore_eos: bool = False
    # Ollama's: how long the model stays loaded after this request (scale to zero)
    keep_alive: Annotated[float | None, PlainValidator(lambda v: None if v is None else _keep_alive(v))] = None
    stop_token_ids: list[Annotated[int, Field(ge=0, lt=2**31)]] = Field([], max_length=64)
    priority: Literal["realtime", "standard", "batch"] = "realtime"  # service class
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputs | None = None

    def sampling_kwargs(self) -> dict:
        """The `SamplingParams` fields this request sets (None means: the engine's default)."""
        names = ("temperature", "top_p", "presence_penalty", "frequency_penalty", "top_k", "min_p",
                 "repetition_penalty")
        kwargs = {k: getattr(self, k) for k in names if getattr(self, k) is not None}
        return dict(kwargs, stop=self.stop, min_tokens=self.min_tokens, ignore_eos=self.ignore_eos,
                    stop_token_ids=self.stop_token_ids)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def constraint(self) -> Constraint | None:
        """What `response_format` or `structured_outputs` asks the output to be. A json_schema
        without `strict: true` is constrained too, with keywords the engine cannot enforce
        ignored (OpenAI constrains only strict schemas; a constrained answer is never worse)."""
        fmt, so = self.response_format, self.structured_outputs
        if fmt is not None and so is not None and fmt.type != "text":
            raise APIError(400, "Set either response_format or structured_outputs, not both", param="structured_outputs")
        if fmt is not None and fmt.type == "json_object":
            return Constraint("json_object", param="response_format")
        if fmt is not None and fmt.type == "json_schema":
            if fmt.json_schema is None:
                raise APIError(400, "response_format of type 'json_schema' needs a 'json_schema' object",
                               param="response_format.json_schema")
            return Constraint("json", fmt.json_schema.schema_, strict=bool(fmt.json_schema.strict),
                              param="response_format.json_schema.schema")
        if so is None:
            return None
        given = [k for k in ("json_", "regex", "choice", "grammar", "json_object") if getattr(so, k) is not None]
        if len(given) != 1:
            raise APIError(400, "structured_outputs takes exactly one of json, regex, choice, grammar, json_object",
                           param="structured_outputs")
        kind = given[0]
        value = getattr(so, kind)
        param = f"structured_outputs.{kind.rstrip('_')}"
        if kind == "json_":
            if isinstance(value, str):  # vLLM takes the schema as JSON text too
                try:
                    value = jsonsafe.loads(value)
                except ValueError as e:
                    raise APIError(400, f"Invalid '{param}': not JSON: {e}", param=param) from None
            return Constraint("json", value, param=param)
        if kind == "json_object":
            return Constraint("json_object", param=param) if value else None
        return Constraint(kind, value, param=param)


class PromptRef(_Strict):
    """leanserve's extension of chat completions: a prompt template (router/templates.py) whose
    messages go before the request's, its settings defaults the request may override."""

    id: str
    version: str | int | None = None  # a version, a label, or None / "latest": the highest
    variables: dict = Field(default_factory=dict)


class CacheOptions(_Strict):
    """leanserve's per-request response cache setting (router/cache.py): a mode no wider than
    the server's `--response-cache`, and for semantic hits a similarity threshold."""

    mode: Literal["off", "exact", "semantic"] = "semantic"
    threshold: float | None = Field(None, ge=0, le=1)


class ChatCompletionRequest(GenerateRequest):
    prompt: PromptRef | None = None  # before messages: with a prompt they may be empty
    cache: Literal["off", "exact", "semantic"] | CacheOptions | None = None  # extension
    messages: list[ChatMessage]
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    tools: list[Tool] | None = Field(None, max_length=128)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool = True

    @field_validator("messages")
    @classmethod
    def _some_messages(cls, value, info):
        if not value and info.data.get("prompt") is None:
            raise ValueError("List should have at least 1 item after validation, not 0 (or send a prompt)")
        return value

    @property
    def max_new_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def num_logprobs(self) -> int | None:
        if self.top_logprobs is not None and not self.logprobs:
            raise APIError(400, "top_logprobs requires logprobs to be true", param="top_logprobs")
        return (self.top_logprobs or 0) if self.logprobs else None


class CompletionRequest(GenerateRequest):
    prompt: Prompts
    max_tokens: int | None = Field(16, ge=1)
    logprobs: int | None = Field(None, ge=0, le=20)
    echo: Annotated[bool, Unsupported] = False
    suffix: Annotated[str | None, Unsupported] = None


# -- responses ----------------------------------------------------------------------------

def usage(prompt_tokens: int, completion_tokens: int, metrics: list[RequestMetrics], bill: Bill) -> dict:
    """OpenAI's usage plus the request's latency split (the slowest choice's) and its bill
    (all choices')."""
    split = {k: round(max((getattr(m, k) for m in metrics), default=0.0), 3)
             for k in ("queue_ms", "prefill_ms", "decode_ms")} | bill.usage()
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens, "leanserve": split}


def chat_logprobs(lps: list[Logprob], token_text) -> dict:
    def entry(token_id, logprob):
        text = token_text(token_id)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

    return {"content": [dict(entry(lp.token_id, lp.logprob), top_logprobs=[entry(t, v) for t, v in lp.top])
                        for lp in lps]}


def completion_logprobs(lps: list[Logprob], token_text, offset: int) -> dict:
    """The legacy completions shape; `offset` is where this piece starts in the choice's text."""
    tokens = [token_text(lp.token_id) for lp in lps]
    offsets = []
    for t in tokens:
        offsets.append(offset)
        offset += len(t)
    return {"tokens": tokens, "token_logprobs": [lp.logprob for lp in lps],
            "top_logprobs": [{token_text(t): v for t, v in lp.top} for lp in lps], "text_offset": offsets}


def chat_completion(request_id: str, model: str, choices: list[dict], usage: dict) -> dict:
    return {"id": request_id, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": choices, "usage": usage}


def chat_choice(index: int, text: str | None, logprobs: dict | None, finish_reason: str | None,
                tool_calls: list[dict] | None = None) -> dict:
    message = {"role": "assistant", "content": text}
    if tool_calls:
        message["tool_calls"] = tool_calls
    return {"index": index, "message": message, "logprobs": logprobs, "finish_reason": finish_reason}


def chat_chunk(request_id: str, model: str, created: int, choices: list[dict], usage: dict | None = None,
               include_usage: bool = False) -> dict:
    chunk = {"id": request_id, "object": "chat.completion.chunk", "created": created, "model": model,
             "choices": choices}
    if include_usage:
        chunk["usage"] = usage
    return chunk


def chat_chunk_choice(index: int, delta: dict, logprobs: dict | None = None,
                      finish_reason: str | None = None) -> dict:
    return {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}


def completion(request_id: str, model: str, choices: list[dict], usage: dict | None, created: int | None = None,
               include_usage: bool = True) -> dict:
    """A whole completion, or (with `created` from the first chunk) one streamed chunk."""
    body = {"id": request_id, "object": "text_completion", "created": created or int(time.time()),
            "model": model, "choices": choices}
    if include_usage:
        body["usage"] = usage
    return body


def completion_choice(index: int, text: str, logprobs: dict | None, finish_reason: str | None) -> dict:
    return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}


def model_list(names: list[str], created: int, facts: dict) -> dict:
    """`facts` (banner.model_facts) go in the extension field `leanserve`, which clients ignore."""
    return {"object": "list", "data": [{"id": n, "object": "model", "created": created, "owned_by": "leanserve",
                                        "leanserve": facts} for n in names]}
