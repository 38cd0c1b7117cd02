"""Tools shown to the model in its format, and its calls read back as OpenAI streams them."""

from __future__ import annotations

import json

import pytest

from cloudach.errors import InvalidArgument
from cloudach.inference.v1 import inference_pb2 as pb
from inference_svc.templates import Message
from inference_svc.tools import FORMATS, CallParser, check_tools

WEATHER = pb.Tool(name="get_weather", description="Weather now", parameters_json=json.dumps(
    {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}))
TIME = pb.Tool(name="get_time", parameters_json="")


def plan(mode=pb.ToolChoice.MODE_AUTO, name="", tool_format="hermes", tools=(WEATHER, TIME), **kw):
    request = pb.GenerateRequest(tools=list(tools), tool_choice=pb.ToolChoice(mode=mode, function_name=name), **kw)
    return check_tools(request, tool_format)


def read(parser: CallParser, pieces) -> tuple[str, list[dict]]:
    """What a client assembles from the deltas: the content, and each call's id, name and arguments."""
    deltas = [d for piece in pieces for d in parser.push(piece)] + parser.flush()
    content, calls = "", []
    for d in deltas:
        content += d.text
        if d.HasField("tool_call"):
            c = d.tool_call
            if c.id:
                assert c.index == len(calls) and not c.arguments  # the first delta: id and name only
                calls.append({"id": c.id, "name": c.name, "arguments": ""})
            else:
                calls[c.index]["arguments"] += c.arguments
    return content, calls


def chars(text: str) -> list[str]:
    return list(text)  # the worst case: one character a delta


def test_a_forced_call_streams_its_name_then_its_arguments_in_fragments():
    parser = CallParser(plan(pb.ToolChoice.MODE_FUNCTION, "get_weather"))
    text = '{"name": "get_weather", "arguments": {"city": "Paris \\"centre\\" {x}"}}'
    deltas = [d for c in chars(text) for d in parser.push(c)] + parser.flush()
    fragments = [d.tool_call.arguments for d in deltas if d.tool_call.arguments]
    assert len(fragments) > 3  # streamed, not at the end
    content, calls = read(CallParser(plan(pb.ToolChoice.MODE_FUNCTION, "get_weather")), chars(text))
    assert content == "" and len(calls) == 1 and calls[0]["name"] == "get_weather"
    assert json.loads(calls[0]["arguments"]) == {"city": 'Paris "centre" {x}'}
    assert calls[0]["id"].startswith("call_") and len(calls[0]["id"]) == 29


def test_auto_reads_content_and_tagged_calls_in_the_hermes_format():
    text = 'Let me check.<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>\n' \
           '<tool_call>\n{"arguments": {}, "name": "get_time"}\n</tool_call>'
    content, calls = read(CallParser(plan()), chars(text))
    assert content == "Let me check."
    assert [(c["name"], json.loads(c["arguments"])) for c in calls] == [("get_weather", {"city": "Oslo"}), ("get_time", {})]
    assert read(CallParser(plan()), ["Just <tool text, no call."]) == ("Just <tool text, no call.", [])
    assert read(CallParser(plan()), ["<tool_call>not json"]) == ("<tool_call>not json", [])


def test_without_parallel_calls_only_the_first_is_read():
    text = '<tool_call>{"name": "get_time", "arguments": {}}</tool_call><tool_call>{"name": "get_time", "arguments": {}}</tool_call>'
    content, calls = read(CallParser(plan(parallel_tool_calls=False)), [text])
    assert len(calls) == 1 and content == ""  # nothing after the one call allowed, as OpenAI's


def test_the_llama_format_reads_a_bare_json_answer_as_a_call_and_anything_else_as_content():
    _, calls = read(CallParser(plan(tool_format="llama3_json")), ['  {"name": "get_weather", "parameters": ', '{"city": "Rome"}}'])
    assert [(c["name"], json.loads(c["arguments"])) for c in calls] == [("get_weather", {"city": "Rome"})]
    assert read(CallParser(plan(tool_format="llama3_json")), ["It is ", '{"sunny"}']) == ('It is {"sunny"}', [])


def test_the_forced_guide_is_the_call_of_the_named_function_or_of_any_tool():
    named = json.loads(plan(pb.ToolChoice.MODE_FUNCTION, "get_weather").guide[1])
    assert named["properties"]["name"] == {"const": "get_weather"} and list(named["properties"]) == ["name", "arguments"]
    required = json.loads(plan(pb.ToolChoice.MODE_REQUIRED).guide[1])
    assert [c["properties"]["name"]["const"] for c in required["anyOf"]] == ["get_weather", "get_time"]
    assert plan().guide is None and plan(pb.ToolChoice.MODE_NONE) is None


@pytest.mark.parametrize("tools, mode, name, param", [
    ([pb.Tool(name="bad name")], pb.ToolChoice.MODE_AUTO, "", "tools[0].function.name"),
    ([pb.Tool(name="x" * 65)], pb.ToolChoice.MODE_AUTO, "", "tools[0].function.name"),
    ([pb.Tool(name="f", parameters_json='{"type": "array"}')], pb.ToolChoice.MODE_AUTO, "", "tools[0].function.parameters"),
    ([pb.Tool(name="f", parameters_json='[1]')], pb.ToolChoice.MODE_AUTO, "", "tools[0].function.parameters"),
    ([WEATHER], pb.ToolChoice.MODE_FUNCTION, "absent", "tool_choice"),
    ([], pb.ToolChoice.MODE_REQUIRED, "", "tool_choice"),
])
def test_bad_tools_are_refused_naming_the_field(tools, mode, name, param):
    with pytest.raises(InvalidArgument) as raised:
        plan(mode, name, tools=tools)
    assert raised.value.param == param


def test_tools_calls_and_results_are_rendered_in_each_format():
    call = pb.ToolCall(id="call_1", name="get_weather", arguments='{"city": "Oslo"}')
    history = [Message("user", "Weather in Oslo?"), Message("assistant", "", (call,)), Message("tool", "12C")]
    hermes = FORMATS["hermes"].prepare(history, [WEATHER], "Default system.")
    assert hermes[0].role == "system" and hermes[0].content.startswith("Default system.")
    assert '"name": "get_weather"' in hermes[0].content and "<tools>" in hermes[0].content
    assert hermes[2].content == '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>'
    assert (hermes[3].role, hermes[3].content) == ("tool", "<tool_response>\n12C\n</tool_response>")
    llama = FORMATS["llama3_json"].prepare(history, [WEATHER], None)
    assert (llama[0].role, llama[0].content) == ("system", "Environment: ipython")
    assert llama[1].content.startswith("Given the following functions") and llama[1].content.endswith("Weather in Oslo?")
    assert json.loads(llama[2].content) == {"name": "get_weather", "parameters": {"city": "Oslo"}}
    assert (llama[3].role, llama[3].content) == ("ipython", "12C")


@pytest.mark.parametrize("pieces", [list, lambda text: [text]])
def test_odd_calls_unguided_models_write_are_read_without_losing_what_follows(pieces):
    text = ('<tool_call>{"name": "get_time", "arguments": "Oslo"}</tool_call> and '
            '<tool_call>{"name": "get_weather", "arguments": {"city": "Oslo"}, "note": 2}</tool_call> done')
    content, calls = read(CallParser(plan()), pieces(text))
    assert [(c["name"], c["arguments"]) for c in calls] == [("get_time", '"Oslo"'), ("get_weather", '{"city": "Oslo"}')]
    assert content.split() == ["and", "done"]
    content, calls = read(CallParser(plan()), pieces('<tool_call>{"name": "f\\x", "arguments": {}}</tool_call>'))
    assert content == '<tool_call>{"name": "f\\x", "arguments": {}}</tool_call>' and not calls  # not JSON: text
