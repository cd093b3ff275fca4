"""Structured outputs end to end (issue 28): the built-in model, served or offline, answers a
table of JSON schemas, regexes, choices and grammars, and each answer that finishes ("stop")
holds, greedy, sampled and streamed; an unfinished one ("length") is never claimed valid.
Also: the openai client's `parse()`, batch invariance next to constrained rows, every bad
input as a 400 naming its field, a slow-compiling schema next to a streaming request, the
Batch API and async requests, forced tokens and logprobs.

The server is the shared `structured_server` fixture (float32, so a request's greedy tokens
do not depend on what it is batched with). Requests are sent concurrently so they share
forward passes."""
from __future__ import annotations

import copy
import json
import re
import statistics
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import httpx
import jsonschema
import openai
import pytest
from pydantic import BaseModel, Field
from server_fixture import openai_client

from leanserve import Constraint, SamplingParams

pytestmark = pytest.mark.slow

MODEL = "SmolLM2-135M-Instruct"
CHAT = "/v1/chat/completions"


def obj(props: dict, required: list | None = None) -> dict:
    """A closed object; every property required unless `required` says otherwise."""
    return {"type": "object", "properties": props, "required": list(props) if required is None else required,
            "additionalProperties": False}


NAME = {"type": "string", "maxLength": 16}
# name -> (prompt, schema). Strings are bounded so that the answers close within max_tokens.
SCHEMAS = {
    "nested": ("Give a user and their address as JSON.", obj({
        "user": obj({"name": NAME, "age": {"type": "integer", "minimum": 0, "maximum": 120}}),
        "address": obj({"city": NAME, "zip": {"type": "string", "pattern": "^[0-9]{5}$"}})})),
    "arrays": ("List a few tags and scores as JSON.", obj({
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 10}, "minItems": 2, "maxItems": 4},
        "scores": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 9}, "maxItems": 3}})),
    "enum_const": ("Pick a color and a status, as JSON.", obj({
        "color": {"enum": ["red", "green", "blue"]}, "version": {"const": 2},
        "status": {"type": "string", "enum": ["ok", "fail"]}})),
    "patterns": ("Give a product code and a phone number as JSON.", obj({
        "code": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{2}$"},
        "phone": {"type": "string", "pattern": "^\\+1 [0-9]{3} [0-9]{4}$"}})),
    "formats": ("Give a contact record as JSON: a date, an email address and a UUID.", obj({
        "day": {"type": "string", "format": "date"}, "mail": {"type": "string", "format": "email", "maxLength": 30},
        "id": {"type": "string", "format": "uuid"}})),
    "numbers": ("Give three numbers as JSON.", obj({
        "n": {"type": "integer", "minimum": 3, "maximum": 9},
        "x": {"type": "number", "exclusiveMinimum": 0, "maximum": 1},
        "k": {"type": "integer", "minimum": -5, "exclusiveMaximum": 100}})),
    "any_one_of": ("Give a value and a flag as JSON.", obj({
        "v": {"anyOf": [{"type": "integer", "minimum": 0, "maximum": 999}, {"type": "string", "maxLength": 10}]},
        "w": {"oneOf": [{"type": "boolean"}, {"type": "null"}]}})),
    "refs": ("Give two points as JSON.", {
        "$defs": {"point": obj({"x": {"type": "integer", "minimum": -99, "maximum": 99},
                                "y": {"type": "integer", "minimum": -99, "maximum": 99}})},
        **obj({"a": {"$ref": "#/$defs/point"}, "b": {"$ref": "#/$defs/point"}})}),
    "optional": ("Describe a person as JSON.", obj({
        "name": NAME, "nick": {"type": "string", "maxLength": 8},
        "age": {"type": "integer", "minimum": 0, "maximum": 99}}, required=["name"])),
    "top_array": ("List a few items with an id and a flag, as JSON.", {
        "type": "array", "minItems": 1, "maxItems": 3,
        "items": obj({"id": {"type": "integer", "minimum": 1, "maximum": 9}, "ok": {"type": "boolean"}})}),
}
FRAUD_PROMPT = "Gift cards for $9,000 bought at 3am from a new device. Is it fraud? Answer in JSON."


def messages(prompt: str) -> list[dict]:
    return [{"role": "user", "content": prompt}]


def json_schema_format(schema: dict, strict: bool = True, name: str = "answer") -> dict:
    return {"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": strict}}


def validate(text: str, schema: dict) -> None:
    """The reference: jsonschema with the schema's draft (2020-12, for `$defs`) and formats checked."""
    jsonschema.validate(json.loads(text), schema, cls=jsonschema.Draft202012Validator,
                        format_checker=jsonschema.FormatChecker())


def is_valid(text: str, schema: dict) -> bool:
    try:
        validate(text, schema)
        return True
    except (ValueError, jsonschema.ValidationError):
        return False


def check_answer(text: str, finish: str, schema: dict, where: str) -> None:
    """A "stop" answer validates; a "length" one is not valid JSON of the schema (unfinished)."""
    assert finish in ("stop", "length"), (where, finish, text)
    if finish == "stop":
        try:
            validate(text, schema)
        except (ValueError, jsonschema.ValidationError) as e:
            raise AssertionError(f"{where}: {text!r} does not validate: {e}") from None
    else:
        assert not is_valid(text, schema), (where, "claimed length but complete", text)


def metric(server, name: str) -> float:
    return server.metrics().get(name, 0.0)


@pytest.fixture(scope="module")
def client(structured_server) -> openai.OpenAI:
    return openai_client(structured_server, timeout=300)  # the 2-core test machine may be shared


@pytest.fixture(scope="module")
def http(structured_server):
    with httpx.Client(base_url=structured_server.url, timeout=300) as c:
        yield c


def streamed(client, **kw) -> tuple[str, str | None]:
    """The concatenated content deltas of a streamed chat completion and its finish reason."""
    text, finish = "", None
    for chunk in client.chat.completions.create(stream=True, **kw):
        for c in chunk.choices:
            text += c.delta.content or ""
            finish = c.finish_reason or finish
    return text, finish


# -- 1. the schema table ------------------------------------------------------------------------

def test_json_schema_table_greedy_sampled_and_streamed(client):
    """Each schema greedy (response_format), sampled (the structured_outputs extension, the
    schema as a dict or as JSON text, n=2, temperature 1, seeded) and streamed greedy."""
    def greedy(name):
        prompt, schema = SCHEMAS[name]
        r = client.chat.completions.create(model=MODEL, messages=messages(prompt), max_tokens=100, temperature=0,
                                           response_format=json_schema_format(schema, name=name))
        return [(c.message.content, c.finish_reason) for c in r.choices]

    def sampled(name):
        prompt, schema = SCHEMAS[name]
        as_text = list(SCHEMAS).index(name) % 2 == 1  # vLLM takes the schema as JSON text too
        r = client.chat.completions.create(
            model=MODEL, messages=messages(prompt), max_tokens=100, temperature=1.0, seed=11, n=2,
            extra_body={"structured_outputs": {"json": json.dumps(schema) if as_text else schema}})
        return [(c.message.content, c.finish_reason) for c in r.choices]

    def stream(name):
        prompt, schema = SCHEMAS[name]
        return [streamed(client, model=MODEL, messages=messages(prompt), max_tokens=100, temperature=0,
                         response_format=json_schema_format(schema, name=name))]

    jobs = [(kind, name) for name in SCHEMAS for kind in ("greedy", "sampled", "stream")]
    runs = {"greedy": greedy, "sampled": sampled, "stream": stream}
    with ThreadPoolExecutor(len(jobs)) as pool:
        results = dict(zip(jobs, pool.map(lambda job: runs[job[0]](job[1]), jobs)))
    finishes = []
    for (kind, name), answers in results.items():
        for i, (text, finish) in enumerate(answers):
            check_answer(text, finish, SCHEMAS[name][1], f"{name} {kind} #{i}")
            finishes.append(finish)
        if kind == "stream":  # the deltas add up to the very answer of the non-streamed request
            assert answers == results[("greedy", name)], name
    assert finishes.count("stop") >= 0.8 * len(finishes), results  # never vacuous


# -- 2. the openai client's parse() --------------------------------------------------------------

class FraudCheck(BaseModel):
    fraud: bool
    reason: str = Field(max_length=60)


def test_openai_parse_returns_the_pydantic_instance(client):
    completion = client.chat.completions.parse(model=MODEL, messages=messages(FRAUD_PROMPT), max_tokens=100,
                                               temperature=0, response_format=FraudCheck)
    choice = completion.choices[0]
    assert choice.finish_reason == "stop"
    assert isinstance(choice.message.parsed, FraudCheck)
    assert choice.message.parsed == FraudCheck.model_validate_json(choice.message.content)
    assert len(choice.message.parsed.reason) <= 60
    bill = completion.usage.model_extra["leanserve"]
    assert {"energy_joules", "carbon_grams", "cost_usd", "energy_source", "decode_ms"} <= set(bill)
    assert completion.usage.completion_tokens > 0


# -- 3. regex, choice, grammars, on chat and completions ---------------------------------------

REGEX = r"\d{3}-[a-z]{2,5}"
LARK = r'''
start: "Order " count " " item ("," item)? "."
count: /[1-9][0-9]?/
item: "apple" | "pear" | "fig"
'''
LARK_CHECK = r"Order [1-9][0-9]? (apple|pear|fig)(,(apple|pear|fig))?\."
GBNF = r'''
root ::= "(" num op num ")"
num ::= [1-9] [0-9]?
op ::= " + " | " - " | " * "
'''


def gbnf_check(text: str) -> bool:
    """By hand: "(a op b)" with a, b in 1..99 written without a leading zero."""
    if not (text.startswith("(") and text.endswith(")")):
        return False
    parts = text[1:-1].split(" ")
    return (len(parts) == 3 and parts[1] in "+-*" and len(parts[1]) == 1
            and all(p.isdigit() and 1 <= len(p) <= 2 and p[0] != "0" for p in (parts[0], parts[2])))


def test_regex_choice_and_grammars_hold_on_chat_and_completions(client):
    prompt = "Write an order code."
    chat_cases = {  # name -> (structured_outputs, n, temperature, check)
        "regex": ({"regex": REGEX}, 2, 1.0, lambda t: re.fullmatch(REGEX, t)),
        "regex_greedy": ({"regex": REGEX}, 1, 0, lambda t: re.fullmatch(REGEX, t)),
        "choice": ({"choice": ["yes", "no"]}, 4, 1.0, lambda t: t in ("yes", "no")),
        "lark": ({"grammar": LARK}, 2, 1.0, lambda t: re.fullmatch(LARK_CHECK, t)),
        "gbnf": ({"grammar": GBNF}, 2, 1.0, gbnf_check),
    }

    def chat(case):
        so, n, temperature, _ = chat_cases[case]
        r = client.chat.completions.create(model=MODEL, messages=messages(prompt), max_tokens=40, n=n, seed=5,
                                           temperature=temperature, extra_body={"structured_outputs": so})
        return [(c.message.content, c.finish_reason) for c in r.choices]

    def completion(case):
        so, n, temperature, _ = chat_cases[case]
        r = client.completions.create(model=MODEL, prompt="Order code:", max_tokens=40, n=n, seed=5,
                                      temperature=temperature, extra_body={"structured_outputs": so})
        return [(c.text, c.finish_reason) for c in r.choices]

    jobs = [(f, case) for case in chat_cases for f in (chat, completion)]
    with ThreadPoolExecutor(len(jobs)) as pool:
        results = list(pool.map(lambda job: (job, job[0](job[1])), jobs))
    for (f, case), answers in results:
        assert len(answers) == chat_cases[case][1]
        for text, finish in answers:
            assert finish == "stop" and chat_cases[case][3](text), (f.__name__, case, text, finish)


# -- 4. batch invariance (engine level) ----------------------------------------------------------

def test_unconstrained_rows_keep_their_solo_tokens_next_to_constrained_ones(builtin_llm):
    tok = builtin_llm.tokenizer
    prompts = [tok.encode(tok.apply_chat_template(messages(p)), add_special_tokens=False)
               for p in (SCHEMAS["nested"][0], "Write a short poem about the sea.", SCHEMAS["refs"][0])]
    n = 48
    plain = SamplingParams(temperature=0, max_tokens=n)
    nested = SamplingParams(temperature=0, max_tokens=n, constraint=Constraint("json", SCHEMAS["nested"][1]))
    refs = SamplingParams(temperature=0, max_tokens=n, constraint=Constraint("regex", REGEX))
    together = builtin_llm.generate(prompts, [nested, plain, refs])
    alone = [builtin_llm.generate([p], [sp])[0] for p, sp in zip(prompts, [nested, plain, refs])]
    assert together[1].token_ids == alone[1].token_ids  # the unconstrained row: exactly its solo tokens
    assert together[0].token_ids == alone[0].token_ids and together[2].token_ids == alone[2].token_ids
    check_answer(together[0].text, together[0].finish_reason, SCHEMAS["nested"][1], "nested")
    assert re.fullmatch(REGEX, together[2].text)


# -- 5. json_object and text --------------------------------------------------------------------

def test_json_object_and_text_response_formats(client):
    prompt = 'Reply with a JSON object with exactly one key, "name", for a cat called Tom.'

    def ask(**kw):
        r = client.chat.completions.create(model=MODEL, messages=messages(prompt), max_tokens=40, temperature=0, **kw)
        return r.choices[0].message.content, r.choices[0].finish_reason

    asks = [dict(response_format={"type": "json_object"}),
            dict(extra_body={"structured_outputs": {"json_object": True}}),
            dict(response_format={"type": "text"}), dict()]
    with ThreadPoolExecutor(len(asks)) as pool:
        (obj_text, obj_finish), (ext_text, ext_finish), text, plain = pool.map(lambda kw: ask(**kw), asks)
    assert obj_text.startswith("{"), obj_text
    if obj_finish == "stop":  # any object may nest on and on: a cut one is "length", never claimed whole
        assert isinstance(json.loads(obj_text), dict), obj_text
    else:
        assert obj_finish == "length"
    assert (ext_text, ext_finish) == (obj_text, obj_finish)
    assert text == plain  # "text" is no constraint at all


# -- 6. bad input -------------------------------------------------------------------------------

NOT_SCHEMA = obj({"a": {"type": "integer", "minimum": 0, "maximum": 9, "not": {"const": 3}}})

BAD = [  # (what, extra body fields, param)
    ("bad type", {"response_format": json_schema_format({"type": "strnig"})}, "response_format.json_schema.schema"),
    ("bad type, extension", {"structured_outputs": {"json": {"type": "object", "properties": {"a": {"type": 7}}}}},
     "structured_outputs.json"),
    ("strict with not", {"response_format": json_schema_format(NOT_SCHEMA, strict=True)},
     "response_format.json_schema.schema"),
    ("invalid regex", {"structured_outputs": {"regex": "(ab"}}, "structured_outputs.regex"),
    ("invalid lark", {"structured_outputs": {"grammar": "start: undefined_rule"}}, "structured_outputs.grammar"),
    ("invalid gbnf", {"structured_outputs": {"grammar": 'root ::= "a" missing'}}, "structured_outputs.grammar"),
    ("two keys", {"structured_outputs": {"regex": "a", "choice": ["a"]}}, "structured_outputs"),
    ("no key", {"structured_outputs": {}}, "structured_outputs"),
    ("json_schema missing", {"response_format": {"type": "json_schema"}}, "response_format.json_schema"),
    ("both", {"response_format": {"type": "json_object"}, "structured_outputs": {"regex": "a"}},
     "structured_outputs"),
    ("json not JSON", {"structured_outputs": {"json": "{not json"}}, "structured_outputs.json"),
]


@pytest.mark.parametrize("what,extra,param", BAD, ids=[b[0] for b in BAD])
def test_bad_structured_input_is_a_400_naming_its_field(http, what, extra, param):
    body = {"model": MODEL, "messages": messages("Hi"), "max_tokens": 8, "temperature": 0, **extra}
    started = time.monotonic()
    r = http.post(CHAT, json=body)
    assert r.status_code == 400, (what, r.text)
    assert time.monotonic() - started < 10
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["type"] == "invalid_request_error" and error["param"] == param, error
    if what != "two keys" and what != "both":  # the completions endpoint parses them the same way
        completion = dict(body, prompt="Hi")
        del completion["messages"]
        r = http.post("/v1/completions", json=completion)
        assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
    good = http.post(CHAT, json={"model": MODEL, "messages": messages("Hi"), "max_tokens": 8, "temperature": 0,
                                 "structured_outputs": {"choice": ["yes", "no"]}})
    assert good.status_code == 200 and good.json()["choices"][0]["message"]["content"] in ("yes", "no")


def test_a_keyword_strict_refuses_is_ignored_with_strict_false(http):
    body = {"model": MODEL, "messages": messages("Give a digit as JSON."), "max_tokens": 30, "temperature": 0}
    refused = http.post(CHAT, json=dict(body, response_format=json_schema_format(NOT_SCHEMA, strict=True)))
    assert refused.status_code == 400 and "not" in refused.json()["error"]["message"], refused.text
    r = http.post(CHAT, json=dict(body, response_format=json_schema_format(NOT_SCHEMA, strict=False)))
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    enforced = copy.deepcopy(NOT_SCHEMA)
    del enforced["properties"]["a"]["not"]  # ignored; the rest is enforced
    check_answer(choice["message"]["content"], choice["finish_reason"], enforced, "strict false")
    assert choice["finish_reason"] == "stop"


# -- 7. a slow compile does not slow a streaming request -----------------------------------------

def slow_schema(n: int = 4000) -> dict:
    """Thousands of optional properties with patterns: llguidance needs ~1.7 s for 4000 (measured
    on the 2-core test machine; the time grows with the square of the count). The names are
    new each run, so the server's grammar cache never has it."""
    salt = uuid.uuid4().hex[:6]
    return {"type": "object", "properties": {
        f"p{i}_{salt}": {"type": "string", "pattern": "[a-z]{2,8}[0-9]{1,3}"} for i in range(n)}}


def test_a_slow_compile_does_not_raise_the_tpot_of_a_streaming_request(client, structured_server):
    compiled = metric(structured_server, "leanserve_structured_compile_seconds_sum")
    arrivals: list[float] = []
    answered = threading.Event()

    def stream():
        seen = None
        for chunk in client.chat.completions.create(
                model=MODEL, messages=messages("Tell a long story about a dragon."), max_tokens=400, temperature=0,
                stream=True, extra_body={"ignore_eos": True}):
            if chunk.choices and chunk.choices[0].delta.content:
                arrivals.append(time.perf_counter())
            if answered.is_set():
                seen = len(arrivals) if seen is None else seen
                if len(arrivals) > seen + 5:
                    break

    with ThreadPoolExecutor(1) as pool:
        streaming = pool.submit(stream)
        while len(arrivals) < 30 and not streaming.done():
            time.sleep(0.01)
        sent = time.perf_counter()
        r = client.chat.completions.create(model=MODEL, messages=messages("Hi"), max_tokens=1, temperature=0,
                                           response_format=json_schema_format(slow_schema(), strict=False))
        done = time.perf_counter()
        answered.set()
        streaming.result()
    assert r.choices[0].finish_reason in ("stop", "length")
    took = metric(structured_server, "leanserve_structured_compile_seconds_sum") - compiled
    gaps = [(b, b - a) for a, b in zip(arrivals, arrivals[1:])]
    before = [g for t, g in gaps[5:] if t < sent]  # past the first tokens' warm-up
    during = [g for t, g in gaps if sent < t < done]
    assert took > 0.3 and len(before) >= 10 and len(during) >= 5, (took, done - sent, len(before), len(during))
    p50_before, p50_during = statistics.median(before), statistics.median(during)
    assert p50_during <= 3 * p50_before + 0.005, (p50_before, p50_during, took)


def test_slow_compiles_do_not_hold_up_another_requests_compile(client):
    """Order, not a time ratio: the trivial request, sent while two slow grammars compile, finishes first."""
    def slow_request() -> float:
        try:
            client.chat.completions.create(model=MODEL, messages=messages("Hi"), max_tokens=1, temperature=0,
                                           response_format=json_schema_format(slow_schema(6000), strict=False))
        except openai.BadRequestError:  # a loaded machine may take past the 10 s limit: refused, fine
            pass
        return time.perf_counter()

    regex = "[0-9]{3}-" + uuid.uuid4().hex[:6]  # new each run: never cached
    with ThreadPoolExecutor(2) as pool:
        slow = [pool.submit(slow_request) for _ in range(2)]
        time.sleep(1.0)  # both are compiling now (each takes seconds)
        assert not any(f.done() for f in slow), "the slow schemas compiled in under a second: make them slower"
        try:
            r = client.chat.completions.create(model=MODEL, messages=messages("Hi"), max_tokens=24, temperature=0,
                                               extra_body={"structured_outputs": {"regex": regex}})
        except openai.BadRequestError as e:
            raise AssertionError(f"a trivial regex refused: {e}") from None
        trivial_done = time.perf_counter()
        slow_done = [f.result() for f in slow]
    assert re.fullmatch(regex, r.choices[0].message.content)
    assert trivial_done < min(slow_done), "the trivial request waited for the slow compiles"


# -- 8. Batch API and async requests --------------------------------------------------------------

def test_batch_api_and_async_requests_take_response_format(client, http):
    names = ["nested", "enum_const", "refs", "top_array"]

    def body(name, **kw):
        prompt, schema = SCHEMAS[name]
        return {"model": MODEL, "messages": messages(prompt), "max_tokens": 100, "temperature": 0,
                "response_format": json_schema_format(schema, name=name), **kw}

    lines = [{"custom_id": name, "method": "POST", "url": CHAT, "body": body(name)} for name in names]
    lines.append({"custom_id": "bad", "method": "POST", "url": CHAT,
                  "body": body("nested", response_format=json_schema_format({"type": "strnig"}))})
    data = "".join(json.dumps(x) + "\n" for x in lines).encode()
    file_id = client.files.create(file=("structured.jsonl", data), purpose="batch").id
    batch = client.batches.create(input_file_id=file_id, endpoint=CHAT, completion_window="24h")

    submitted = http.post("/v1/async/chat/completions", json=body("patterns"))
    assert submitted.status_code == 202, submitted.text
    refused = http.post("/v1/async/chat/completions", json=body("patterns", structured_outputs={"regex": "(x"},
                                                                response_format=None))
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "structured_outputs.regex"

    deadline = time.monotonic() + 120
    job = submitted.json()
    while job["status"] not in ("completed", "failed") and time.monotonic() < deadline:
        time.sleep(0.2)
        job = http.get(f"/v1/async/{job['id']}").json()
    assert job["status"] == "completed" and job["response"]["status_code"] == 200, job
    choice = job["response"]["body"]["choices"][0]
    assert choice["finish_reason"] == "stop"
    validate(choice["message"]["content"], SCHEMAS["patterns"][1])

    while batch.status not in ("completed", "failed", "cancelled", "expired") and time.monotonic() < deadline:
        time.sleep(0.2)
        batch = client.batches.retrieve(batch.id)
    assert batch.status == "completed", batch
    results = {x["custom_id"]: x for x in map(json.loads, client.files.content(batch.output_file_id).text.splitlines())}
    results |= {x["custom_id"]: x for x in map(json.loads, client.files.content(batch.error_file_id).text.splitlines())}
    for name in names:
        response = results[name]["response"]
        assert response["status_code"] == 200, response
        choice = response["body"]["choices"][0]
        assert choice["finish_reason"] == "stop", choice
        validate(choice["message"]["content"], SCHEMAS[name][1])
    bad = results["bad"]["response"]
    assert bad["status_code"] == 400 and bad["body"]["error"]["param"] == "response_format.json_schema.schema"


# -- 9. forced tokens and logprobs --------------------------------------------------------------

def test_forced_tokens_and_none_when_logprobs_are_asked(builtin_llm, client, structured_server):
    engine = builtin_llm.engine
    tok = builtin_llm.tokenizer
    prompt = tok.encode(tok.apply_chat_template(messages(SCHEMAS["nested"][0])), add_special_tokens=False)
    constraint = Constraint("json", SCHEMAS["nested"][1])
    forced, constrained = engine.forced_tokens, engine.constrained_tokens
    out = builtin_llm.generate([prompt], SamplingParams(temperature=0, max_tokens=80, constraint=constraint))[0]
    assert engine.forced_tokens > forced  # `{"user":{"name":"` and the other keys are forced
    assert engine.constrained_tokens - constrained == len(out.token_ids)
    forced = engine.forced_tokens
    with_lp = builtin_llm.generate([prompt], SamplingParams(temperature=0, max_tokens=80, logprobs=0,
                                                            constraint=constraint))[0]
    assert engine.forced_tokens == forced
    assert len(with_lp.logprobs) == len(with_lp.token_ids) and with_lp.finish_reason == "stop"
    assert with_lp.token_ids == out.token_ids  # greedy: a forced token is the one greedy picks under the mask
    validate(with_lp.text, SCHEMAS["nested"][1])

    # the same through the server and its metrics
    before = metric(structured_server, "leanserve_structured_forced_tokens_total")
    kw = dict(model=MODEL, messages=messages(SCHEMAS["nested"][0]), max_tokens=80, temperature=0,
              response_format=json_schema_format(SCHEMAS["nested"][1]))
    plain = client.chat.completions.create(**kw)
    after = metric(structured_server, "leanserve_structured_forced_tokens_total")
    assert after > before
    logged = client.chat.completions.create(logprobs=True, **kw)
    assert metric(structured_server, "leanserve_structured_forced_tokens_total") == after
    assert len(logged.choices[0].logprobs.content) == logged.usage.completion_tokens
    assert logged.choices[0].message.content == plain.choices[0].message.content


# -- 10. too few tokens -------------------------------------------------------------------------

def test_max_tokens_before_the_structure_closes(client):
    kw = dict(model=MODEL, messages=messages(FRAUD_PROMPT), max_tokens=6, temperature=0)
    r = client.chat.completions.create(response_format=json_schema_format(FraudCheck.model_json_schema()), **kw)
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 6
    with pytest.raises(ValueError):
        json.loads(r.choices[0].message.content)
    with pytest.raises(openai.LengthFinishReasonError):
        client.chat.completions.parse(response_format=FraudCheck, **kw)
