"""Tool calling (issue 28): tools in the prompt, calls under a grammar, calls parsed back out.

Two halves. Without a server: chat templates in the Qwen2/Hermes, Llama 3.1 and Mistral
styles (written here) pick their formats, get the tools, past calls and tool results, and the
call grammar of each format, run on the built-in model, gives text that parses into valid
calls and that `ToolStream`, fed token by token, streams as the same calls. With the shared
`structured_server` (the built-in SmolLM2, whose template knows no tools: the generic
format): every `tool_choice` through the official `openai` client, streamed and not (the
stream rebuilt as a client does equals the plain answer of the same greedy request),
parallel calls, a two-turn conversation, LangChain's `ChatOpenAI` as a real client, and bad
input (a 400 each, and the server serves the next request).

A call is valid when its name is one of the tools and its `arguments` parse as JSON and
validate (jsonschema, a reference nobody here wrote) against that tool's `parameters`.
"""
from __future__ import annotations

import json

import httpx
import jsonschema
import pytest
from pydantic import BaseModel, Field

from leanserve.serve import protocol, tools as T
from server_fixture import openai_client

MODEL = "SmolLM2-135M-Instruct"

WEATHER_PARAMS = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 24},
                                                   "unit": {"enum": ["celsius", "fahrenheit"]}},
                  "required": ["city", "unit"], "additionalProperties": False}
TIME_PARAMS = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 24}},
               "required": ["city"], "additionalProperties": False}
WEATHER = {"name": "get_weather", "description": "The current weather in a city", "parameters": WEATHER_PARAMS}
TIME = {"name": "get_time", "description": "The current local time in a city", "parameters": TIME_PARAMS}
FUNCTIONS = [WEATHER, TIME]
TOOLS = [{"type": "function", "function": f} for f in FUNCTIONS]
PARAMETERS = {f["name"]: f["parameters"] for f in FUNCTIONS}
ASK_BOTH = [{"role": "user", "content": "What is the weather and the local time in Paris?"}]


def check_call(name: str, arguments, parameters: dict = PARAMETERS) -> dict:
    """One call is valid: a known function, arguments a JSON string (or dict) valid for it."""
    assert name in parameters, f"{name!r} is not among the tools"
    args = json.loads(arguments) if isinstance(arguments, str) else arguments
    jsonschema.validate(args, parameters[name])
    return args


def check_message_calls(calls, parameters: dict = PARAMETERS) -> list[tuple[str, dict]]:
    """OpenAI message tool_calls (client objects): valid, typed, unique ids; (name, args) each."""
    assert calls, "no tool calls"
    ids = [c.id for c in calls]
    assert all(isinstance(i, str) and i for i in ids) and len(set(ids)) == len(ids), ids
    assert all(c.type == "function" for c in calls)
    return [(c.function.name, check_call(c.function.name, c.function.arguments, parameters)) for c in calls]


# -- formats, templates, grammars: no server ------------------------------------------------

QWEN2_TEMPLATE = """\
{%- if tools %}
{{- '<|im_start|>system\\n' }}
{%- if messages[0]['role'] == 'system' %}{{- messages[0]['content'] }}{%- else %}{{- 'You are a helpful assistant.' }}{%- endif %}
{{- "\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\n" }}
{{- "You are provided with function signatures within <tools></tools> XML tags:\\n<tools>" }}
{%- for tool in tools %}{{- "\\n" }}{{- tool | tojson }}{%- endfor %}
{{- "\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within " }}
{{- "<tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": <function-name>, \\"arguments\\": <args-json-object>}" }}
{{- "\\n</tool_call><|im_end|>\\n" }}
{%- elif messages[0]['role'] == 'system' %}
{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
{%- endif %}
{%- for message in messages %}
{%- if message.role == "user" or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}
{%- elif message.role == "assistant" %}
{{- '<|im_start|>' + message.role }}
{%- if message.content %}{{- '\\n' + message.content }}{%- endif %}
{%- for tool_call in message.tool_calls %}
{%- if tool_call.function is defined %}{%- set tool_call = tool_call.function %}{%- endif %}
{{- '\\n<tool_call>\\n{"name": "' }}{{- tool_call.name }}{{- '", "arguments": ' }}{{- tool_call.arguments | tojson }}{{- '}\\n</tool_call>' }}
{%- endfor %}
{{- '<|im_end|>\\n' }}
{%- elif message.role == "tool" %}
{%- if loop.index0 == 0 or messages[loop.index0 - 1].role != "tool" %}{{- '<|im_start|>user' }}{%- endif %}
{{- '\\n<tool_response>\\n' + message.content + '\\n</tool_response>' }}
{%- if loop.last or messages[loop.index0 + 1].role != "tool" %}{{- '<|im_end|>\\n' }}{%- endif %}
{%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}
"""

LLAMA31_TEMPLATE = """\
{{- bos_token }}
{%- if messages[0]['role'] == 'system' %}{%- set system_message = messages[0]['content'] | trim %}{%- set messages = messages[1:] %}
{%- else %}{%- set system_message = "" %}{%- endif %}
{{- "<|start_header_id|>system<|end_header_id|>\\n\\n" }}
{%- if tools is not none %}{{- "Environment: ipython\\n" }}{%- endif %}
{{- system_message + "<|eot_id|>" }}
{%- if tools is not none %}
{%- set first_user_message = messages[0]['content'] | trim %}{%- set messages = messages[1:] %}
{{- '<|start_header_id|>user<|end_header_id|>\\n\\n' }}
{{- "Given the following functions, please respond with a JSON for a function call with its proper arguments that best answers the given prompt.\\n\\n" }}
{{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}. Do not use variables.\\n\\n' }}
{%- for t in tools %}{{- t | tojson(indent=4) }}{{- "\\n\\n" }}{%- endfor %}
{{- first_user_message + "<|eot_id|>" }}
{%- endif %}
{%- for message in messages %}
{%- if not (message.role == 'ipython' or message.role == 'tool' or 'tool_calls' in message) %}
{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}
{%- elif 'tool_calls' in message %}
{%- set tool_call = message.tool_calls[0].function %}
{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
{{- '{"name": "' + tool_call.name + '", "parameters": ' }}{{- tool_call.arguments | tojson }}{{- "}<|eot_id|>" }}
{%- else %}
{{- "<|start_header_id|>ipython<|end_header_id|>\\n\\n" + message.content + "<|eot_id|>" }}
{%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}
"""

MISTRAL_TEMPLATE = """\
{%- set user_messages = messages | selectattr("role", "equalto", "user") | list %}
{{- bos_token }}
{%- for message in messages %}
{%- if message.role == "user" %}
{%- if tools is not none and message == user_messages[-1] %}
{{- "[AVAILABLE_TOOLS][" }}
{%- for tool in tools %}{{- tool | tojson }}{%- if not loop.last %}{{- ", " }}{%- endif %}{%- endfor %}
{{- "][/AVAILABLE_TOOLS]" }}
{%- endif %}
{{- "[INST]" + message.content + "[/INST]" }}
{%- elif message.role == "assistant" and message.tool_calls %}
{{- "[TOOL_CALLS][" }}
{%- for tool_call in message.tool_calls %}
{{- {"name": tool_call.function.name, "arguments": tool_call.function.arguments, "id": tool_call.id} | tojson }}
{%- if not loop.last %}{{- ", " }}{%- endif %}
{%- endfor %}
{{- "]" + eos_token }}
{%- elif message.role == "assistant" %}
{{- message.content + eos_token }}
{%- elif message.role == "tool" %}
{{- '[TOOL_RESULTS]{"content": ' + message.content | tojson + ', "call_id": "' + message.tool_call_id + '"}[/TOOL_RESULTS]' }}
{%- endif %}
{%- endfor %}
"""

NATIVE = {"hermes": (QWEN2_TEMPLATE, T.HERMES), "llama3_json": (LLAMA31_TEMPLATE, T.LLAMA3),
          "mistral": (MISTRAL_TEMPLATE, T.MISTRAL)}

# A past call and its result, as a client sends them back.
HISTORY = [
    {"role": "user", "content": "What is the weather in Oslo?"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_oslo1", "type": "function",
         "function": {"name": "get_weather", "arguments": '{"city": "Oslo", "unit": "celsius"}'}}]},
    {"role": "tool", "tool_call_id": "call_oslo1", "content": "-3 degrees, snow"},
    *ASK_BOTH,
]


def chat_request(**body) -> protocol.ChatCompletionRequest:
    return protocol.ChatCompletionRequest.model_validate({"model": MODEL, **body})


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir):
    """A fresh leanserve Tokenizer of the built-in model per template (see `with_template`)."""
    from leanserve.models.tokenizer import Tokenizer

    def with_template(template: str | None):
        tok = Tokenizer.from_hf_folder(str(tokenizer_dir))
        if template is not None:
            tok.chat_template = template
        return tok

    return with_template


@pytest.mark.parametrize("name", list(NATIVE))
def test_a_template_that_knows_tools_picks_its_native_format(name):
    template, fmt = NATIVE[name]
    assert T.tool_format(template) is fmt
    assert fmt.native


def test_a_template_without_tools_gets_the_generic_format(tokenizer):
    builtin = tokenizer(None).chat_template
    assert builtin and "tools" not in builtin
    assert T.tool_format(builtin) is T.GENERIC
    assert T.tool_format(None) is T.GENERIC
    assert not T.GENERIC.native


@pytest.mark.parametrize("name", list(NATIVE))
def test_native_templates_get_the_tools_the_past_calls_and_the_results(name, tokenizer):
    template, fmt = NATIVE[name]
    plan = T.plan_chat(chat_request(messages=HISTORY, tools=TOOLS, tool_choice="auto"), fmt)
    assert plan.fmt is fmt
    assert plan.template_vars == {"tools": TOOLS}
    past = plan.messages[1]
    assert past["role"] == "assistant" and past["tool_calls"] == [
        {"id": "call_oslo1", "type": "function",
         "function": {"name": "get_weather", "arguments": {"city": "Oslo", "unit": "celsius"}}}]  # a dict
    result = plan.messages[2]
    assert result["role"] == "tool" and result["tool_call_id"] == "call_oslo1"
    assert result["content"] == "-3 degrees, snow"
    text = tokenizer(template).apply_chat_template(plan.messages, **plan.template_vars)
    assert all(any(json.dumps(tool, indent=i) in text for i in (None, 4)) for tool in TOOLS)
    assert "The current local time in a city" in text
    assert {"hermes": '{"name": "get_weather", "arguments": {"city": "Oslo", "unit": "celsius"}}',
            "llama3_json": '{"name": "get_weather", "parameters": {"city": "Oslo", "unit": "celsius"}}',
            "mistral": '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Oslo", "unit": "celsius"}, '
                       '"id": "call_oslo1"}]'}[name] in text
    assert "-3 degrees, snow" in text and "local time in Paris" in text
    # "none": the template gets no tools, and the answer is not parsed
    plain = T.plan_chat(chat_request(messages=ASK_BOTH, tools=TOOLS, tool_choice="none"), fmt)
    assert plain.template_vars == {} and plain.fmt is None and plain.constraint is None
    assert "get_time" not in tokenizer(template).apply_chat_template(plain.messages, **plain.template_vars)


def test_the_generic_format_describes_the_tools_in_the_system_prompt(tokenizer):
    plan = T.plan_chat(chat_request(messages=[{"role": "system", "content": "Be brief."}, *HISTORY], tools=TOOLS),
                       T.GENERIC)
    assert plan.template_vars == {}
    system, user, past, result = plan.messages[:4]
    assert system["role"] == "system" and system["content"].startswith("Be brief.")
    for tool in TOOLS:
        assert json.dumps(tool) in system["content"]
    assert past["role"] == "assistant" and "tool_calls" not in past
    assert past["content"] == '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo", "unit": "celsius"}}' \
                              '\n</tool_call>'
    assert result == {"role": "user", "content": "<tool_response>\n-3 degrees, snow\n</tool_response>"}
    text = tokenizer(None).apply_chat_template(plan.messages)
    assert "<tools>" in text and "-3 degrees, snow" in text


def token_deltas(tok, ids: list[int]) -> list[str]:
    """The text each token adds, as a detokenizer streams it."""
    deltas, previous = [], ""
    for i in range(len(ids)):
        text = tok.decode(ids[:i + 1])
        deltas.append(text[len(previous):])
        previous = text
    return deltas


def stream_calls(fmt: T.ToolFormat, deltas: list[str]) -> tuple[str, list[dict]]:
    """Feeds `deltas` to a ToolStream; (content, calls as {id, name, arguments}) as a client
    rebuilds them, checking the shape of every delta on the way."""
    stream = T.ToolStream(fmt)
    content, calls = "", []
    for k, delta in enumerate(deltas):
        for out in stream.feed(delta, final=k == len(deltas) - 1):
            if "content" in out:
                assert not calls
                content += out["content"]
                continue
            (part,) = out["tool_calls"]
            i = part["index"]
            if i == len(calls):  # a new call: its first delta
                assert part["type"] == "function" and part["id"].startswith("call_")
                assert part["function"]["arguments"] == ""
                calls.append({"id": part["id"], "name": part["function"]["name"], "arguments": ""})
            else:
                assert i == len(calls) - 1 and set(part) == {"index", "function"}
                assert set(part["function"]) == {"arguments"} and part["function"]["arguments"]
                calls[i]["arguments"] += part["function"]["arguments"]
    return content, calls


def prompt_ids(tok, plan: T.ChatPlan) -> list[int]:
    return tok.encode(tok.apply_chat_template(plan.messages, **plan.template_vars), add_special_tokens=False)


@pytest.fixture(scope="module")
def native_generations(builtin_llm, tokenizer):
    """Per format and choice, the built-in model's greedy answer under the call grammar: all in
    one batch. (plan, GenerationOutput) by (format name, choice)."""
    from leanserve.engine.sequence import SamplingParams

    formats = {**{n: (tmpl, fmt) for n, (tmpl, fmt) in NATIVE.items()}, "generic": (None, T.GENERIC)}
    choices = {"required": "required", "single": "required", "named": {"type": "function", "function": {"name": "get_time"}},
               "auto": "auto"}
    jobs = {}
    for fname, (template, fmt) in formats.items():
        tok = tokenizer(template)
        for cname, choice in choices.items():
            plan = T.plan_chat(chat_request(messages=ASK_BOTH, tools=TOOLS, tool_choice=choice,
                                            parallel_tool_calls=cname != "single"), fmt)
            jobs[fname, cname] = (plan, prompt_ids(tok, plan))
    outs = builtin_llm.generate([ids for _, ids in jobs.values()],
                                [SamplingParams(temperature=0, max_tokens=90, constraint=plan.constraint)
                                 for plan, _ in jobs.values()])
    return {key: (plan, out) for (key, (plan, _)), out in zip(jobs.items(), outs)}


@pytest.mark.parametrize("fname", ["hermes", "llama3_json", "mistral", "generic"])
@pytest.mark.parametrize("cname", ["required", "single", "named", "auto"])
def test_the_call_grammar_gives_calls_that_parse_validate_and_stream_alike(native_generations, builtin_llm,
                                                                          fname, cname):
    plan, out = native_generations[fname, cname]
    fmt = plan.fmt
    text = out.text
    calls = T.parse_calls(text, fmt)
    deltas = token_deltas(builtin_llm.tokenizer, out.token_ids)
    assert "".join(deltas) == text
    content, streamed = stream_calls(fmt, deltas)
    if cname == "auto" and calls is None:  # text that does not start a call
        assert not text.lstrip().startswith(fmt.lead) and content == text and not streamed
        assert T.answer(text, out.finish_reason, fmt) == (text, None, out.finish_reason)
        return
    assert out.finish_reason == "stop", text
    assert calls, f"{fname} {cname}: {text!r}"
    for c in calls:
        check_call(c.name, c.arguments)
    if cname == "single" or cname == "named":
        assert len(calls) == 1
    if cname == "named":
        assert calls[0].name == "get_time"
    assert text.startswith(fmt.lead)
    assert content == "" and [(c["name"], c["arguments"]) for c in streamed] == [(c.name, c.arguments) for c in calls]
    content, message_calls, finish = T.answer(text, out.finish_reason, fmt)
    assert content is None and finish == "tool_calls"
    assert [(c["function"]["name"], c["function"]["arguments"]) for c in message_calls] == \
        [(c.name, c.arguments) for c in calls]


# -- the server: the built-in SmolLM2 (generic format) through real clients ---------------

@pytest.fixture(scope="module")
def client(structured_server):
    return openai_client(structured_server)


def ask(client, *, stream: bool = False, messages=ASK_BOTH, max_tokens: int = 90, **kw):
    return client.chat.completions.create(model=MODEL, messages=messages, tools=TOOLS, temperature=0,
                                          max_tokens=max_tokens, stream=stream, **kw)


def rebuild_stream(chunks) -> tuple[str | None, list[dict], str | None]:
    """(content, calls as {id, name, arguments}, finish_reason) from streamed chunks, as a client
    does: a call's first delta has its id, type, name and arguments ""; later ones fragments."""
    content, calls, finish = None, [], None
    for chunk in chunks:
        if not chunk.choices:
            continue
        choice = chunk.choices[0]
        delta = choice.delta
        if delta.content:
            content = (content or "") + delta.content
        for part in delta.tool_calls or []:
            if part.index == len(calls):
                assert part.id and part.type == "function" and part.function.name
                assert part.function.arguments == ""
                calls.append({"id": part.id, "name": part.function.name, "arguments": ""})
            else:
                assert part.index == len(calls) - 1 and part.id is None and not part.function.name
                calls[part.index]["arguments"] += part.function.arguments
        finish = choice.finish_reason or finish
    return content, calls, finish


def pairs(calls) -> list[tuple[str, str]]:
    return [(c.function.name, c.function.arguments) if not isinstance(c, dict) else (c["name"], c["arguments"])
            for c in calls]


@pytest.mark.slow
@pytest.mark.parametrize("choice", ["required", "named", "auto"])
def test_tool_choice_calls_are_valid_and_stream_as_the_plain_answer(client, choice):
    tool_choice = {"type": "function", "function": {"name": "get_time"}} if choice == "named" else choice
    plain = ask(client, tool_choice=tool_choice)
    message, finish = plain.choices[0].message, plain.choices[0].finish_reason
    if choice == "auto" and not message.tool_calls:
        assert isinstance(message.content, str) and message.content and finish in ("stop", "length")
        assert not message.content.lstrip().startswith("<tool_call>")
    else:
        assert message.content is None and finish == "tool_calls", message
        made = check_message_calls(message.tool_calls)
        if choice == "named":
            assert [name for name, _ in made] == ["get_time"]
    content, streamed, stream_finish = rebuild_stream(ask(client, tool_choice=tool_choice, stream=True))
    assert stream_finish == finish
    assert pairs(streamed) == pairs(message.tool_calls or [])
    assert len({c["id"] for c in streamed}) == len(streamed)
    assert (content or None) == message.content
    # the SDK's own stream helper accumulates to the same message
    with client.chat.completions.stream(model=MODEL, messages=ASK_BOTH, tools=TOOLS, temperature=0,
                                        max_tokens=90, tool_choice=tool_choice) as s:
        final = s.get_final_completion()
    assert pairs(final.choices[0].message.tool_calls or []) == pairs(message.tool_calls or [])
    assert final.choices[0].finish_reason == finish


@pytest.mark.slow
def test_tool_choice_none_answers_text(client):
    plain = ask(client, tool_choice="none", max_tokens=30)
    message = plain.choices[0].message
    assert not message.tool_calls and isinstance(message.content, str) and message.content
    assert plain.choices[0].finish_reason in ("stop", "length")


@pytest.mark.slow
@pytest.mark.parametrize("parallel", [False, True])
def test_parallel_tool_calls(client, parallel):
    reply = ask(client, tool_choice="required", parallel_tool_calls=parallel)
    calls = reply.choices[0].message.tool_calls
    check_message_calls(calls)
    assert reply.choices[0].finish_reason == "tool_calls"
    if not parallel:
        assert len(calls) == 1


@pytest.mark.slow
def test_a_second_turn_with_the_call_and_its_result(client):
    first = ask(client, tool_choice="required", parallel_tool_calls=False)
    (call,) = first.choices[0].message.tool_calls
    messages = [*ASK_BOTH,
                {"role": "assistant", "content": None, "tool_calls": [
                    {"id": call.id, "type": "function",
                     "function": {"name": call.function.name, "arguments": call.function.arguments}}]},
                {"role": "tool", "tool_call_id": call.id, "content": "18 degrees, sunny; 14:05"}]
    second = ask(client, messages=messages, tool_choice="none", max_tokens=20)
    assert isinstance(second.choices[0].message.content, str)
    again = ask(client, messages=messages, tool_choice="auto", max_tokens=60)
    message = again.choices[0].message
    assert message.tool_calls is None or check_message_calls(message.tool_calls)


class City(BaseModel):
    """A city and the country it is in."""

    name: str = Field(max_length=20)
    country: str = Field(max_length=20)


@pytest.fixture(scope="module")
def chat(structured_server):
    from langchain_openai import ChatOpenAI

    return ChatOpenAI(base_url=structured_server.url + "/v1", api_key="none", model=MODEL, temperature=0,
                      max_tokens=100, max_retries=0)


@pytest.mark.slow
@pytest.mark.parametrize("method", [None, "json_schema", "function_calling"])
def test_langchain_structured_output(chat, method):
    kw = {} if method is None else {"method": method}
    city = chat.with_structured_output(City, **kw).invoke("Name a big city in France.")
    assert isinstance(city, City) and city.name and city.country


@pytest.mark.slow
def test_langchain_bound_tools_plain_and_streamed(chat):
    # an OpenAI-format tool with additionalProperties false: a bare function's schema lets this
    # small model add keys until max_tokens
    bound = chat.bind_tools([TOOLS[0]], tool_choice="required")
    message = bound.invoke("What is the weather in Paris?")
    assert message.tool_calls and not message.invalid_tool_calls
    for call in message.tool_calls:
        check_call(call["name"], call["args"])
    total = None
    for piece in bound.stream("What is the weather in Paris?"):
        total = piece if total is None else total + piece
    assert not total.invalid_tool_calls
    assert [(c["name"], c["args"]) for c in total.tool_calls] == [(c["name"], c["args"]) for c in message.tool_calls]


BAD = {
    "unknown function": (dict(tools=TOOLS, tool_choice={"type": "function", "function": {"name": "nope"}}),
                         "tool_choice"),
    "choice without tools": (dict(tool_choice="required"), "tool_choice"),
    "duplicate names": (dict(tools=[TOOLS[0], TOOLS[0]]), "tools"),
    "invalid parameters": (dict(tools=[{"type": "function", "function": {
        "name": "f", "parameters": {"type": "object", "properties": {"x": {"type": "no-such-type"}}}}}]),
        "tools[0].function.parameters"),
    "bad name": (dict(tools=[{"type": "function", "function": {"name": "has space", "parameters": TIME_PARAMS}}]),
                 "tools"),
    "regex with tools": (dict(tools=TOOLS, structured_outputs={"regex": "[a-z]+"}), "structured_outputs"),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(BAD))
def test_bad_tool_requests_are_400_and_the_server_carries_on(structured_server, case):
    body, param = BAD[case]
    r = httpx.post(f"{structured_server.url}/v1/chat/completions", timeout=60,
                   json={"model": MODEL, "messages": ASK_BOTH, "max_tokens": 5, **body})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert set(error) >= {"message", "type", "param", "code"} and error["message"]
    assert error["param"] is not None and error["param"].startswith(param), error
    ok = httpx.post(f"{structured_server.url}/v1/chat/completions", timeout=60,
                    json={"model": MODEL, "messages": ASK_BOTH, "max_tokens": 1, "tools": TOOLS,
                          "tool_choice": "none"})
    assert ok.status_code == 200, ok.text
