"""What /openapi.json says of each route: its request body and the errors it can answer.

The handlers read their raw bodies themselves (type and size checks first, then strict
pydantic parsing into OpenAI-shaped errors), so FastAPI sees no body parameter and would
declare none. Each route declares its contract where it is registered instead,
`router.post(path, **openapi.spec(Model, 400, 404))`, and `install` puts the models'
`$defs` into components and drops the 422 FastAPI adds for path parameters (a malformed
request is a 400 here).
"""
from __future__ import annotations

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel, ConfigDict

REF = "#/components/schemas/{model}"
RETRY_AFTER = {"Retry-After": {"description": "Seconds to wait before trying again",
                               "schema": {"type": "integer"}, "required": True}}
ERRORS = {  # status -> its response, besides the ErrorResponse body
    400: {"description": "The request is malformed or asks for something this server does not do"},
    401: {"description": "No API key, or a wrong one",
          "headers": {"WWW-Authenticate": {"schema": {"type": "string"}, "required": True}}},
    403: {"description": "The adapter path is outside the allowed adapter directories"},
    404: {"description": "No such model, adapter or object"},
    408: {"description": "The request body stalled"},
    409: {"description": "The object is in a state that does not allow this"},
    413: {"description": "The request body is too large"},
    415: {"description": "The body's Content-Type is not the one this endpoint reads"},
    429: {"description": "The server, or this client's share of it, is full", "headers": RETRY_AFTER},
    500: {"description": "The engine failed the request"},
    503: {"description": "The server is starting or shutting down", "headers": RETRY_AFTER},
}
JSON_BODY = (400, 401, 408, 413, 415)  # every route that reads a JSON body can answer these
GENERATE = (*JSON_BODY, 404, 429, 500, 503)

# protocol.py parses these fields with plain validators, which pydantic describes as "any
# value"; this is what those validators accept.
_TOKEN_IDS = {"type": "array", "items": {"type": "integer", "minimum": 0}, "minItems": 1}
_TEXT_PART = {"type": "object", "required": ["type", "text"],
              "properties": {"type": {"const": "text"}, "text": {"type": "string"}}}
PLAIN_FIELDS = {
    "content": {"anyOf": [{"type": "string"}, {"type": "array", "items": _TEXT_PART}, {"type": "null"}]},
    "prompt": {"anyOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}, "minItems": 1},
                         _TOKEN_IDS, {"type": "array", "items": _TOKEN_IDS, "minItems": 1}]},
    "stop": {"anyOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}}, {"type": "null"}]},
}


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    """OpenAI's error body, the only shape an error leaves in."""

    error: ErrorDetail


class VLLMLoadAdapter(BaseModel):
    """vLLM's names for `adapters.LoadAdapter`'s fields, at /v1/load_lora_adapter."""

    model_config = ConfigDict(extra="forbid")
    lora_name: str
    lora_path: str


UNLOAD_ADAPTER = {"type": "object", "properties": {"lora_name": {"type": "string"}, "name": {"type": "string"}},
                  "anyOf": [{"required": ["lora_name"]}, {"required": ["name"]}]}
FILE_UPLOAD = {"type": "object", "required": ["file", "purpose"],
               "properties": {"file": {"type": "string", "format": "binary"}, "purpose": {"enum": ["batch", "assistants", "user_data"]}}}
FILE_QUERY = {"limit": {"type": "integer", "minimum": 1, "maximum": 10000, "default": 10000},
              "order": {"enum": ["asc", "desc"], "default": "desc"}, "after": {"type": "string"},
              "purpose": {"type": "string"}}
BATCH_QUERY = {"limit": {"type": "integer", "minimum": 1, "maximum": 100, "default": 20}, "after": {"type": "string"}}
# With "stream": true. Left open: OpenAPI 3.1 has no per-event schema (3.2's itemSchema), and
# schemathesis checks each event, an object {data, event, ...}, against this one.
STREAM = {"text/event-stream": {"schema": {"description": "server-sent events: `data: <chunk JSON>` lines, "
                                                          "then `data: [DONE]`"}}}
BINARY = {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}


def spec(body: type[BaseModel] | dict | None, *errors: int, media_type: str = "application/json",
         query: dict[str, dict] | None = None, ok: dict | None = None) -> dict:
    """Keyword arguments of a route decorator: the request body (a model, or a JSON schema),
    the error statuses (401 is added: every /v1 route checks the key), the query parameters,
    and media types the success response has besides (or, with response_class=FileResponse,
    instead of) JSON."""
    extra: dict = {}
    if body is not None:
        extra["requestBody"] = {"required": True, "content": {media_type: {"schema": _schema(body)}}}
    if query:
        extra["parameters"] = [{"name": name, "in": "query", "required": False, "schema": schema}
                               for name, schema in query.items()]
    responses = {status: {"model": ErrorResponse, **ERRORS[status]} for status in sorted({401, *errors})}
    if ok:
        responses[200] = {"content": ok}
    return {"responses": responses, "openapi_extra": extra}


def _schema(body: type[BaseModel] | dict) -> dict:
    """A model's schema as a $ref, with itself and its definitions in `$defs` for `install`
    to move into components."""
    if isinstance(body, dict):
        return body
    schema = body.model_json_schema(ref_template=REF)
    defs = schema.pop("$defs", {})
    for props in (m.get("properties", {}) for m in (schema, *defs.values())):
        for name, accepted in PLAIN_FIELDS.items():
            if name in props and props[name].keys() <= {"title", "default"}:
                props[name] = {**accepted, **props[name]}
    return {"$ref": REF.format(model=body.__name__), "$defs": {body.__name__: schema, **defs}}


def install(app: FastAPI) -> None:
    """Serves the document built here at /openapi.json."""
    def document() -> dict:
        if app.openapi_schema is None:
            app.openapi_schema = _document(app)
        return app.openapi_schema

    app.openapi = document


def _document(app: FastAPI) -> dict:
    doc = get_openapi(title=app.title, version=app.version, routes=app.routes)
    schemas = doc.setdefault("components", {}).setdefault("schemas", {})
    for operation in (op for ops in doc["paths"].values() for op in ops.values()):
        operation["responses"].pop("422", None)
        for content in operation.get("requestBody", {}).get("content", {}).values():
            schemas.update(content["schema"].pop("$defs", {}))
    for name in ("HTTPValidationError", "ValidationError"):
        schemas.pop(name, None)
    return doc
