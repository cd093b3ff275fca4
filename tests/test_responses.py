"""The Responses API (issue 31) through the official `openai` client, on the shared
`structured_server` (the built-in SmolLM2 in float32, a job store in its own data dir).

Create from a string and from items, instructions, a strict json_schema answer (validated
with jsonschema), a function tool round trip, streaming (typed events in OpenAI's order,
sequence numbers counting up, and the final response equal to the same greedy request
unstreamed), stored responses (retrieve, input_items, delete, previous_response_id) and
bad input (400s naming what is not supported, 404s for unknown ids), background responses
(polled, cancelled) and LangChain's `ChatOpenAI(use_responses_api=True)` as a second client.
The translation of items into chat messages is checked alone too, without a server.
"""
from __future__ import annotations

import io
import json
import time

import httpx
import jsonschema
import openai
import pytest

from leanserve.serve import responses as R
from leanserve.serve.protocol import APIError
from server_fixture import openai_client

MODEL = "SmolLM2-135M-Instruct"
WEATHER = {"type": "function", "name": "get_weather", "description": "The current weather in a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 16}},
                          "required": ["city"], "additionalProperties": False}}
PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 120}},
          "required": ["name", "age"], "additionalProperties": False}



# -- the translation alone ------------------------------------------------------------------

def test_items_become_chat_messages_calls_joined():
    items = R.normalize_input([
        {"role": "user", "content": "Weather in Paris and Rome?"},
        {"type": "function_call", "call_id": "call_1", "name": "get_weather", "arguments": '{"city":"Paris"}'},
        {"type": "function_call", "call_id": "call_2", "name": "get_weather", "arguments": '{"city":"Rome"}'},
        {"type": "function_call_output", "call_id": "call_1", "output": "21C"},
        {"type": "function_call_output", "call_id": "call_2", "output": [{"type": "input_text", "text": "25C"}]}])
    assert [i["id"][:3] for i in items] == ["msg", "fc_", "fc_", "fco", "fco"]
    messages = R.to_messages(items)
    assert [m["role"] for m in messages] == ["user", "assistant", "tool", "tool"]
    assert [c["id"] for c in messages[1]["tool_calls"]] == ["call_1", "call_2"]
    assert messages[3] == {"role": "tool", "tool_call_id": "call_2", "name": "get_weather", "content": "25C"}
    req = R.ResponsesRequest(model="m", input="x", instructions="Be brief.", tools=[WEATHER], service_tier="flex")
    chat = R.chat_request(req, items, "batch")
    assert chat.messages[0].role == "system" and chat.messages[0].content == "Be brief."
    assert chat.tools[0].function.strict is True and chat.priority == "batch"


@pytest.mark.parametrize("value, param", [
    ([{"type": "computer_call_output", "call_id": "c"}], "input[0]"),
    ([{"type": "item_reference"}], "input[0].id"),
    ([{"role": "user", "content": [{"type": "input_file", "file_id": "f"}]}], "input[0].content[0]"),
    ([{"role": "tool", "content": "x"}], "input[0].role"),
    ([{"type": "function_call", "name": "f", "arguments": "{}"}], "input[0].call_id"),
])
def test_items_that_cannot_be_served_are_400s(value, param):
    with pytest.raises(APIError) as e:
        R.normalize_input(value)
    assert e.value.status == 400 and e.value.param == param


# -- through the server ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def client(structured_server):
    return openai_client(structured_server)


def text_of(response) -> str:
    return "".join(part.text for item in response.output if item.type == "message" for part in item.content)


@pytest.mark.slow
def test_a_string_input_answers_with_one_message_and_its_bill(client):
    r = client.responses.create(model=MODEL, input="Say hello.", max_output_tokens=8, temperature=0,
                                metadata={"k": "v"}, user="u1")
    assert r.object == "response" and r.id.startswith("resp_") and r.model == MODEL
    assert [item.type for item in r.output] == ["message"]
    assert r.output[0].role == "assistant" and r.output[0].content[0].type == "output_text"
    assert r.output_text and r.output_text == text_of(r)
    assert r.usage.input_tokens > 0 and 0 < r.usage.output_tokens <= 8
    assert r.usage.total_tokens == r.usage.input_tokens + r.usage.output_tokens
    assert r.usage.model_extra["leanserve"]["energy_joules"] >= 0
    assert r.metadata == {"k": "v"} and r.user == "u1" and r.service_tier == "default"
    if r.usage.output_tokens == 8:
        assert r.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens"
    else:
        assert r.status == "completed"


@pytest.mark.slow
def test_items_and_instructions_are_the_chat_messages(client):
    """The same conversation as chat messages gives the same greedy answer."""
    items = [{"role": "user", "content": [{"type": "input_text", "text": "Name a colour."}]},
             {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Blue."}]},
             {"role": "user", "content": "Another one?"}]
    r = client.responses.create(model=MODEL, input=items, instructions="Answer in one word.", max_output_tokens=6,
                                temperature=0)
    chat = client.chat.completions.create(model=MODEL, max_tokens=6, temperature=0, messages=[
        {"role": "system", "content": "Answer in one word."}, {"role": "user", "content": "Name a colour."},
        {"role": "assistant", "content": "Blue."}, {"role": "user", "content": "Another one?"}])
    assert r.output_text == chat.choices[0].message.content
    assert r.usage.input_tokens == chat.usage.prompt_tokens


@pytest.mark.slow
def test_a_strict_json_schema_answer_validates(client):
    r = client.responses.create(model=MODEL, input="Invent a person.", max_output_tokens=40, temperature=0,
                                text={"format": {"type": "json_schema", "name": "person", "schema": PERSON,
                                                 "strict": True}})
    assert r.status == "completed"
    jsonschema.validate(json.loads(r.output_text), PERSON)
    assert r.text.format.type == "json_schema"


@pytest.mark.slow
def test_a_function_tool_round_trip(client):
    ask = [{"role": "user", "content": "What is the weather in Paris?"}]
    r = client.responses.create(model=MODEL, input=ask, tools=[WEATHER], tool_choice="required",
                                parallel_tool_calls=False, max_output_tokens=40, temperature=0)
    [call] = r.output
    assert call.type == "function_call" and call.name == "get_weather" and call.call_id.startswith("call_")
    jsonschema.validate(json.loads(call.arguments), WEATHER["parameters"])
    assert r.tools[0].strict is True
    follow = ask + [call.model_dump(exclude_none=True),
                    {"type": "function_call_output", "call_id": call.call_id, "output": '{"celsius": 21}'}]
    answer = client.responses.create(model=MODEL, input=follow, tools=[WEATHER], tool_choice="none",
                                     max_output_tokens=12, temperature=0)
    assert [item.type for item in answer.output] == ["message"] and answer.output_text


@pytest.mark.slow
def test_a_stream_has_openai_events_and_ends_as_the_plain_response(client):
    kwargs = dict(model=MODEL, input="Count to five.", max_output_tokens=10, temperature=0, store=False)
    plain = client.responses.create(**kwargs)
    with client.responses.stream(**kwargs) as stream:
        events = list(stream)
        final = stream.get_final_response() if plain.status == "completed" else None
    kinds = [e.type for e in events]
    assert kinds[:5] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added", "response.output_text.delta"]
    end = ["response.output_text.done", "response.content_part.done", "response.output_item.done",
           f"response.{plain.status}"]
    assert kinds[-4:] == end and set(kinds[4:-4]) == {"response.output_text.delta"}
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == plain.output_text
    last = events[-1].response
    assert last.output_text == plain.output_text and last.status == plain.status
    assert last.usage.output_tokens == plain.usage.output_tokens
    if final is not None:
        assert final.output_text == plain.output_text


@pytest.mark.slow
def test_a_streamed_function_call(client):
    kwargs = dict(model=MODEL, input="Weather in Rome?", tools=[WEATHER], tool_choice="required",
                  parallel_tool_calls=False, max_output_tokens=40, temperature=0, store=False)
    plain = client.responses.create(**kwargs)
    with client.responses.stream(**kwargs) as stream:
        events = list(stream)
        final = stream.get_final_response()
    kinds = [e.type for e in events]
    assert kinds[2] == "response.output_item.added" and events[2].item.type == "function_call"
    assert kinds[-3:] == ["response.function_call_arguments.done", "response.output_item.done",
                          "response.completed"]
    args = "".join(e.delta for e in events if e.type == "response.function_call_arguments.delta")
    [call], [plain_call] = final.output, plain.output
    assert args == call.arguments == plain_call.arguments and call.name == plain_call.name == "get_weather"


@pytest.mark.slow
def test_stored_responses_retrieve_list_chain_and_delete(client):
    first = client.responses.create(model=MODEL, input="My name is Ada.", max_output_tokens=6, temperature=0)
    got = client.responses.retrieve(first.id)
    assert got.id == first.id and got.output_text == first.output_text
    second = client.responses.create(model=MODEL, input="What is my name?", previous_response_id=first.id,
                                     max_output_tokens=6, temperature=0)
    assert second.previous_response_id == first.id
    assert second.usage.input_tokens > first.usage.input_tokens + first.usage.output_tokens
    items = list(client.responses.input_items.list(second.id, order="asc"))
    assert [i.type for i in items] == ["message", "message", "message"]
    assert [i.role for i in items] == ["user", "assistant", "user"]
    assert items[0].content[0].text == "My name is Ada." and items[-1].content[0].text == "What is my name?"
    page = client.responses.input_items.list(second.id, limit=2)  # newest first
    assert [i.id for i in page.data] == [items[2].id, items[1].id] and page.has_more
    assert [i.id for i in page] == [i.id for i in reversed(items)]  # the client pages on
    client.responses.delete(first.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(first.id)
    assert client.responses.retrieve(second.id).id == second.id  # a chain's later response stands alone
    with pytest.raises(openai.NotFoundError):
        client.responses.delete(first.id)


@pytest.mark.slow
def test_item_references_name_stored_items(client):
    """An item_reference is replaced by the item it names, from any stored response."""
    first = client.responses.create(model=MODEL, input="My name is Ada.", max_output_tokens=4, temperature=0)
    [said] = client.responses.input_items.list(first.id).data
    refs = [{"type": "item_reference", "id": said.id}, {"type": "item_reference", "id": first.output[0].id},
            {"role": "user", "content": "What is my name?"}]
    by_ref = client.responses.create(model=MODEL, input=refs, max_output_tokens=6, temperature=0)
    chained = client.responses.create(model=MODEL, input="What is my name?", previous_response_id=first.id,
                                      max_output_tokens=6, temperature=0)
    assert by_ref.output_text == chained.output_text and by_ref.usage.input_tokens == chained.usage.input_tokens
    items = list(client.responses.input_items.list(by_ref.id, order="asc"))
    assert [i.id for i in items[:2]] == [said.id, first.output[0].id] and items[1].role == "assistant"
    with pytest.raises(openai.NotFoundError) as e:
        client.responses.create(model=MODEL, input=[{"type": "item_reference", "id": "msg_nope"}])
    assert e.value.body["param"] == "input[0].id"


@pytest.mark.slow
def test_truncation_auto_drops_the_oldest_turns(client):
    """With room for only the last turn beside max_output_tokens, "auto" drops the older ones
    and "disabled" (the default) is a 400; a tiny JSON schema keeps the answer short."""
    context = client.models.list().data[0].model_extra["leanserve"]["max_model_len"]
    history = [{"role": "user" if i % 2 == 0 else "assistant", "content": f"Note {i}: " + "lorem ipsum " * 20}
               for i in range(6)]
    kwargs = dict(model=MODEL, input=history + [{"role": "user", "content": "Yes or no?"}], temperature=0,
                  max_output_tokens=context - 60, instructions="Answer in JSON.",
                  text={"format": {"type": "json_schema", "name": "yes", "strict": True, "schema": {
                      "type": "object", "properties": {"yes": {"type": "boolean"}}, "required": ["yes"],
                      "additionalProperties": False}}})
    with pytest.raises(openai.BadRequestError):  # the whole conversation does not leave the room
        client.responses.create(**kwargs)
    r = client.responses.create(**kwargs, truncation="auto")
    assert r.truncation == "auto" and r.status == "completed" and json.loads(r.output_text)["yes"] in (True, False)
    assert r.usage.input_tokens <= 60
    assert len(client.responses.input_items.list(r.id, limit=100).data) == 7  # the stored input stays whole


@pytest.mark.slow
def test_store_false_keeps_nothing(client):
    r = client.responses.create(model=MODEL, input="Hi", max_output_tokens=2, store=False)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(r.id)
    with pytest.raises(openai.NotFoundError) as e:
        client.responses.create(model=MODEL, input="Hi", max_output_tokens=2, previous_response_id=r.id)
    assert e.value.body["param"] == "previous_response_id"


@pytest.mark.slow
@pytest.mark.parametrize("body, param, named", [
    ({"input": [{"type": "reasoning", "summary": []}]}, "input[0]", "reasoning"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]},
     "input[0].content[0]", "input_image"),
    ({"input": "Hi", "tools": [{"type": "web_search"}]}, "tools[0].type", "web_search"),
    ({"input": "Hi", "tools": [{"type": "computer_use_preview"}]}, "tools[0].type", "computer_use_preview"),
    ({"input": "Hi", "prompt": {"id": "pmpt_1"}}, "prompt", "prompt templates"),  # no --prompts DIR here
    ({"input": "Hi", "tool_choice": "required"}, "tool_choice", "tools"),
    ({"input": "Hi", "temperature": 3}, "temperature", "temperature"),
    ({"input": "Hi", "frobnicate": 1}, "frobnicate", "frobnicate"),
])
def test_bad_input_is_a_400_naming_it(structured_server, body, param, named):
    r = httpx.post(f"{structured_server.url}/v1/responses", json={"model": MODEL, **body}, timeout=30)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and named in error["message"] and error["type"] == "invalid_request_error"


@pytest.mark.slow
def test_unknown_ids_are_404s(client, structured_server):
    for call in (lambda: client.responses.retrieve("resp_nope"), lambda: client.responses.delete("resp_nope"),
                 lambda: client.responses.cancel("resp_nope"),
                 lambda: client.responses.input_items.list("resp_nope")):
        with pytest.raises(openai.NotFoundError) as e:
            call()
        assert e.value.body["code"] == "not_found"
    with pytest.raises(openai.NotFoundError):
        client.responses.create(model=MODEL, input="Hi", previous_response_id="resp_nope")
    with pytest.raises(openai.NotFoundError):
        client.responses.create(model="no-such-model", input="Hi")


@pytest.mark.slow
def test_a_background_response_is_polled_to_its_end(client):
    r = client.responses.create(model=MODEL, input="Say hi.", max_output_tokens=6, temperature=0, background=True)
    assert r.background is True and r.status in ("queued", "in_progress") and r.output == []
    deadline = time.monotonic() + 60
    while r.status in ("queued", "in_progress") and time.monotonic() < deadline:
        time.sleep(0.2)
        r = client.responses.retrieve(r.id)
    assert r.status in ("completed", "incomplete") and r.output_text and r.usage.output_tokens > 0
    assert client.responses.cancel(r.id).status == r.status  # it has ended: nothing to cancel


@pytest.mark.slow
def test_a_background_response_is_cancelled(client):
    r = client.responses.create(model=MODEL, input="Count from 1 to 500, one number per line.",
                                max_output_tokens=400, background=True)
    cancelled = client.responses.cancel(r.id)
    assert cancelled.id == r.id and cancelled.status == "cancelled"
    assert client.responses.retrieve(r.id).status == "cancelled"
    plain = client.responses.create(model=MODEL, input="Hi", max_output_tokens=2, store=False)
    with pytest.raises(openai.BadRequestError):
        client.responses.cancel(client.responses.create(model=MODEL, input="Hi", max_output_tokens=2).id)
    assert plain.status in ("completed", "incomplete")  # the server serves on


@pytest.mark.slow
def test_background_needs_store(structured_server):
    r = httpx.post(f"{structured_server.url}/v1/responses", timeout=30,
                   json={"model": MODEL, "input": "Hi", "background": True, "store": False})
    assert r.status_code == 400 and r.json()["error"]["param"] == "background"


@pytest.mark.slow
def test_a_streamed_background_response(client):
    """Streamed as any response, stored from the start; the client may leave, it runs on."""
    kwargs = dict(model=MODEL, input="Say hi.", max_output_tokens=6, temperature=0)
    with client.responses.stream(**kwargs, background=True) as stream:
        events = list(stream)
    assert events[0].type == "response.created" and events[0].response.background is True
    assert [e.sequence_number for e in events] == list(range(len(events)))
    final = events[-1].response
    assert events[-1].type in ("response.completed", "response.incomplete")
    stored = client.responses.retrieve(final.id)
    assert stored.status == final.status and stored.output_text == final.output_text == \
        client.responses.create(**kwargs, store=False).output_text
    # a client that reads one delta and goes away: the response is still generated
    long = dict(model=MODEL, input="Count from 1 to 50, one number per line.", max_output_tokens=40,
                background=True, stream=True)
    with client.responses.create(**long) as events:
        rid = next(e for e in events if e.type == "response.created").response.id
    deadline = time.monotonic() + 120
    while client.responses.retrieve(rid).status == "in_progress" and time.monotonic() < deadline:
        time.sleep(0.3)
    assert client.responses.retrieve(rid).status in ("completed", "incomplete")
    # cancelled while streaming: the stream ends, the response is stored cancelled
    with client.responses.create(**dict(long, max_output_tokens=400)) as events:
        kinds = []
        for e in events:
            kinds.append(e.type)
            if e.type == "response.created":
                rid = e.response.id
            if e.type == "response.output_text.delta" and kinds.count(e.type) == 1:
                assert client.responses.cancel(rid).status == "cancelled"
    assert "response.completed" not in kinds and client.responses.retrieve(rid).status == "cancelled"


@pytest.mark.slow
def test_a_flex_tier_runs_in_the_batch_class(client):
    r = client.responses.create(model=MODEL, input="Hi", max_output_tokens=2, service_tier="flex", store=False)
    assert r.service_tier == "flex" and r.status in ("completed", "incomplete")


@pytest.mark.slow
def test_langchain_over_the_responses_api(structured_server):
    """LangChain's ChatOpenAI with use_responses_api, a real client of this API, tools too."""
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(model=MODEL, base_url=f"{structured_server.url}/v1", api_key="none", max_retries=0,
                     temperature=0, max_tokens=40, use_responses_api=True)
    assert llm.invoke("Say hi.").text
    call = llm.bind_tools([WEATHER], tool_choice="get_weather").invoke("Weather in Oslo?").tool_calls[0]
    assert call["name"] == "get_weather" and isinstance(call["args"]["city"], str)


# -- file_search ----------------------------------------------------------------------------

KB = {  # each file one fact, phrased so that an answer repeating it names it
    "kettle.txt": "The Zephyr kettle boils one litre of water in 95 seconds. It has a warranty of seven years.",
    "bicycle.md": "# Comet bicycle\nThe Comet bicycle weighs 9 kilograms and comes in red or blue.",
    "lamp.txt": "The Halo desk lamp uses 6 watts and its LED lasts for 25000 hours.",
}
KB_KINDS = {"kettle.txt": "kitchen", "bicycle.md": "sport", "lamp.txt": "office"}
QUESTION = "What is the warranty of the Zephyr kettle?"


def test_citations_follow_the_phrases_the_answer_repeats():
    from leanserve.rag.backend import SearchHit
    from leanserve.serve import file_search as fs

    kettle = SearchHit("file-k", "kettle.txt", 0.9, text=KB["kettle.txt"])
    lamp = SearchHit("file-l", "lamp.txt", 0.5, text=KB["lamp.txt"])
    text = "The Zephyr kettle has a warranty of seven years. The lamp uses 6 watts! Thanks."
    cited = fs.citations(text, [kettle, lamp])
    assert [(c["filename"], text[:c["index"]][-6:]) for c in cited] == [("kettle.txt", "years."), ("lamp.txt", "watts!")]
    assert all(c["type"] == "file_citation" for c in cited) and cited[0]["file_id"] == "file-k"
    assert fs.citations("I do not know.", [kettle, lamp]) == []  # "do not" etc. are stopwords: no phrase shared
    two = fs.citations("The Zephyr kettle boils fast. The Zephyr kettle is good.", [kettle])
    assert len(two) == 1 and two[0]["index"] == len("The Zephyr kettle boils fast. The Zephyr kettle is good.")


def test_the_context_keeps_to_its_token_budget(builtin_gguf):
    from leanserve.models.tokenizer import Tokenizer
    from leanserve.rag.backend import SearchHit
    from leanserve.serve import file_search as fs

    tok = Tokenizer.from_gguf(str(builtin_gguf))  # the served model's tokenizer counts the budget
    hits = [SearchHit(f"file-{i}", f"f{i}.txt", 1 - i / 10, text=("word " * 100) + str(i)) for i in range(5)]
    found = fs.build_context(fs.Found("q", hits), tok, 250)
    assert [h.file_id for h in found.used] == ["file-0", "file-1"]  # the ranking's prefix that fits
    assert len(tok.encode(found.context, add_special_tokens=False)) <= 250
    assert found.context.startswith(fs.HEADER) and "[f1.txt]" in found.context and "[f2.txt]" not in found.context
    cut = fs.build_context(fs.Found("q", hits), tok, 60)  # the best hit alone is too long: its start
    assert [h.file_id for h in cut.used] == ["file-0"] and len(tok.encode(cut.context, add_special_tokens=False)) <= 62


@pytest.mark.parametrize("tool, param", [
    ({"type": "file_search"}, "tools[0].vector_store_ids"),
    ({"type": "file_search", "vector_store_ids": []}, "tools[0].vector_store_ids"),
    ({"type": "file_search", "vector_store_ids": ["vs_1"], "max_num_results": 0}, "tools[0].max_num_results"),
    ({"type": "file_search", "vector_store_ids": ["vs_1"], "filters": {"type": "eq", "key": "k"}},
     "tools[0].filters"),
    ({"type": "file_search", "vector_store_ids": ["vs_1"], "ranking_options": {"ranker": "best"}},
     "tools[0].ranking_options.ranker"),
    ({"type": "file_search", "vector_store_ids": ["vs_1"], "colour": "red"}, "tools[0].colour"),
])
def test_a_bad_file_search_tool_is_a_400(tool, param):
    from leanserve.serve import file_search as fs

    with pytest.raises(APIError) as e:
        fs.parse([tool])
    assert e.value.status == 400 and e.value.param.startswith(param), e.value.param


@pytest.fixture(scope="module")
def kb(client):
    """A vector store made here: the KB files uploaded through /v1/files, attached, ingested."""
    ids = {name: client.files.create(file=(name, io.BytesIO(text.encode())), purpose="assistants").id
           for name, text in KB.items()}
    store = client.vector_stores.create(name="responses-kb")
    for name, file_id in ids.items():
        client.vector_stores.files.create(vector_store_id=store.id, file_id=file_id,
                                          attributes={"kind": KB_KINDS[name]})
    deadline = time.monotonic() + 120
    while client.vector_stores.retrieve(store.id).status == "in_progress" and time.monotonic() < deadline:
        time.sleep(0.2)
    assert client.vector_stores.retrieve(store.id).file_counts.completed == len(KB)
    return store.id, ids


@pytest.mark.slow
def test_file_search_answers_citing_the_right_file(client, kb):
    store, ids = kb
    r = client.responses.create(model=MODEL, input=QUESTION, temperature=0, max_output_tokens=30,
                                tools=[{"type": "file_search", "vector_store_ids": [store], "max_num_results": 2}],
                                include=["file_search_call.results"])
    call, message = r.output
    assert call.type == "file_search_call" and call.status == "completed" and call.queries == [QUESTION]
    assert [x.filename for x in call.results][0] == "kettle.txt" and len(call.results) == 2
    assert call.results[0].file_id == ids["kettle.txt"] and call.results[0].attributes == {"kind": "kitchen"}
    assert call.results[0].text == KB["kettle.txt"] and 0 < call.results[0].score <= 1
    assert message.type == "message" and "seven" in r.output_text.lower(), r.output_text
    annotations = message.content[0].annotations  # the sentence that says it cites the kettle's file
    assert annotations and annotations[0].filename == "kettle.txt", (r.output_text, annotations)
    assert annotations[0].type == "file_citation" and annotations[0].file_id == ids["kettle.txt"]
    assert "seven" in r.output_text[:annotations[0].index].lower() and annotations[0].index <= len(r.output_text)
    assert {a.filename for a in annotations} <= {x.filename for x in call.results}  # only what was in the context
    assert r.tools[0].type == "file_search" and r.tools[0].vector_store_ids == [store]
    plain = client.responses.create(model=MODEL, input=QUESTION, temperature=0, max_output_tokens=30)
    assert r.usage.input_tokens > plain.usage.input_tokens + 20  # the kettle's text went into the prompt
    # the stored response continues: the search item is kept, not prompted again
    follow = client.responses.create(model=MODEL, input="Thanks!", previous_response_id=r.id, max_output_tokens=4)
    kinds = [i.type for i in client.responses.input_items.list(follow.id, order="asc")]
    assert kinds == ["message", "file_search_call", "message", "message"]


@pytest.mark.slow
def test_file_search_filters_and_results_left_out(client, kb):
    store, _ = kb
    tool = {"type": "file_search", "vector_store_ids": [store], "filters": {"type": "eq", "key": "kind",
                                                                            "value": "office"}}
    r = client.responses.create(model=MODEL, input=QUESTION, max_output_tokens=4, tools=[tool],
                                include=["file_search_call.results"])
    assert [x.filename for x in r.output[0].results] == ["lamp.txt"]
    r = client.responses.create(model=MODEL, input=QUESTION, max_output_tokens=4, tools=[tool], store=False)
    assert r.output[0].type == "file_search_call" and r.output[0].results is None  # not included
    r = client.responses.create(model=MODEL, input=QUESTION, max_output_tokens=4, tools=[tool], tool_choice="none")
    assert [i.type for i in r.output] == ["message"]  # no tools: no search


@pytest.mark.slow
def test_a_streamed_file_search(client, kb):
    store, _ = kb
    kwargs = dict(model=MODEL, input=QUESTION, temperature=0, max_output_tokens=30, store=False,
                  tools=[{"type": "file_search", "vector_store_ids": [store], "max_num_results": 2}])
    plain = client.responses.create(**kwargs)
    with client.responses.stream(**kwargs) as stream:
        events = list(stream)
        if plain.status == "completed":  # the helper's final response is only of a completed one
            assert stream.get_final_response().output_text == plain.output_text
    final = events[-1].response
    kinds = [e.type for e in events]
    assert kinds[:7] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.file_search_call.in_progress", "response.file_search_call.searching",
                         "response.file_search_call.completed", "response.output_item.done"]
    assert events[2].item.type == "file_search_call" and events[2].item.status == "in_progress"
    assert events[6].item.status == "completed" and events[6].item.queries == [QUESTION]
    assert {e.output_index for e in events[2:7]} == {0} and {e.item_id for e in events[3:6]} == {events[2].item.id}
    assert kinds[7:9] == ["response.output_item.added", "response.content_part.added"] and events[7].output_index == 1
    n = kinds.count("response.output_text.annotation.added")
    assert kinds[-4 - n:] == ["response.output_text.annotation.added"] * n + [
        "response.output_text.done", "response.content_part.done", "response.output_item.done",
        f"response.{plain.status}"]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert final.output_text == plain.output_text and [i.type for i in final.output] == ["file_search_call", "message"]
    cited = [a.model_dump() for a in plain.output[1].content[0].annotations]
    assert [e.annotation.model_dump() for e in events if e.type == "response.output_text.annotation.added"] == cited
    assert [a.model_dump() for a in final.output[1].content[0].annotations] == cited


@pytest.mark.slow
def test_file_search_on_an_unknown_store_is_a_404(structured_server, kb):
    r = httpx.post(f"{structured_server.url}/v1/responses", timeout=30, json={
        "model": MODEL, "input": "Hi", "tools": [{"type": "file_search", "vector_store_ids": [kb[0], "vs_nope"]}]})
    assert r.status_code == 404, r.text
    error = r.json()["error"]
    assert error["param"] == "tools[0].vector_store_ids[1]" and "vs_nope" in error["message"]
    assert error["code"] == "not_found" and error["type"] == "invalid_request_error"


# -- the OpenAI Agents SDK ------------------------------------------------------------------

@pytest.mark.slow
def test_an_agents_sdk_function_tool_loop(structured_server):
    """openai-agents' Runner over /v1/responses (its default model, OpenAIResponsesModel): the
    model calls the tool, the SDK runs it and sends the output back, the model answers."""
    import agents

    calls = []

    @agents.function_tool
    def get_weather(city: str) -> str:
        """The current weather in a city."""
        calls.append(city)
        return f"Sunny and 21 degrees in {city}."

    agents.set_tracing_disabled(True)  # no traces sent anywhere
    agents.set_default_openai_client(openai.AsyncOpenAI(base_url=f"{structured_server.url}/v1", api_key="none",
                                                        max_retries=0), use_for_tracing=False)
    agents.set_default_openai_api("responses")
    agent = agents.Agent(name="weather", instructions="Answer questions about the weather.", tools=[get_weather],
                         model=MODEL, model_settings=agents.ModelSettings(temperature=0, max_tokens=100,
                                                                          tool_choice="required",
                                                                          parallel_tool_calls=False))
    result = agents.Runner.run_sync(agent, "What is the weather in Paris?", max_turns=4)
    assert calls and all(isinstance(c, str) and c for c in calls)
    kinds = [item.type for item in result.new_items]
    assert kinds[:2] == ["tool_call_item", "tool_call_output_item"] and kinds[-1] == "message_output_item", kinds
    assert result.final_output and isinstance(result.final_output, str)
    [first, *rest] = result.raw_responses
    assert first.response_id.startswith("resp_") and first.usage.input_tokens > 0 and rest


@pytest.mark.slow
def test_an_agents_sdk_file_search(structured_server, kb):
    """The SDK's hosted FileSearchTool: it parses the file_search_call and the cited answer."""
    import agents

    agents.set_tracing_disabled(True)
    agents.set_default_openai_client(openai.AsyncOpenAI(base_url=f"{structured_server.url}/v1", api_key="none",
                                                        max_retries=0), use_for_tracing=False)
    agent = agents.Agent(name="kb", tools=[agents.FileSearchTool(vector_store_ids=[kb[0]], max_num_results=2,
                                                                 include_search_results=True)],
                         model=MODEL, model_settings=agents.ModelSettings(temperature=0, max_tokens=100))
    result = agents.Runner.run_sync(agent, QUESTION, max_turns=2)
    [response] = result.raw_responses
    call, message = response.output
    assert call.type == "file_search_call" and call.results[0].filename == "kettle.txt"
    assert message.content[0].annotations[0].filename == "kettle.txt" and result.final_output
