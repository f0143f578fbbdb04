"""G.711 codecs against the standard's values, and LFM2's tool-call syntax (Pythonic and JSON)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from lfm2audio_server.audio import g711_decode, g711_encode
from lfm2audio_server.tools import ToolCallError, call_text, parse_tool_calls, tool_system_prompt


def test_g711_decode_matches_the_standard_tables():
    # ITU-T G.711: mu-law 0xFF/0x7F are +-0, 0x00 is the most negative step; A-law 0xD5/0x55 are +-8.
    assert g711_decode(bytes([0xFF, 0x7F, 0x00, 0x80]), "pcmu").tolist() == [0, 0, -32124, 32124]
    assert g711_decode(bytes([0xD5, 0x55, 0x2A, 0xAA]), "pcma").tolist() == [8, -8, -32256, 32256]


@pytest.mark.parametrize("law", ["pcmu", "pcma"])
def test_g711_round_trip_is_within_one_step(law):
    x = np.linspace(-1, 1, 4001).astype(np.float32)
    y = g711_decode(g711_encode(x, law), law).astype(np.float32) / 32768
    # Logarithmic steps: the error grows with the magnitude, at most half a step (1/16 of the segment).
    assert np.all(np.abs(y - x) <= 0.02 + 0.04 * np.abs(x))
    assert g711_encode(np.zeros(3, np.float32), law) == (b"\xff" * 3 if law == "pcmu" else b"\xd5" * 3)


def test_tool_calls_pythonic_and_json():
    assert parse_tool_calls('[get_weather(city="Paris", days=2)]') == [("get_weather", '{"city": "Paris", "days": 2}')]
    assert parse_tool_calls("[a(), b(x=[1, 2])]") == [("a", "{}"), ("b", '{"x": [1, 2]}')]
    assert parse_tool_calls('[{"name": "f", "arguments": {"q": "x"}}]') == [("f", '{"q": "x"}')]
    assert parse_tool_calls('{"name": "f", "arguments": "{\\"q\\": 1}"}') == [("f", '{"q": 1}')]
    for bad in ("get_weather(", "[1 + 2]", "[f(x=y)]"):
        with pytest.raises(ToolCallError):
            parse_tool_calls(bad)


def test_tool_prompt_and_call_text():
    tools = [{"name": "f", "description": "d", "parameters": {"type": "object"}}]
    prompt = tool_system_prompt("Be brief.", tools)
    assert prompt.startswith("Be brief.\nList of tools: <|tool_list_start|>[")
    assert json.loads(prompt.split("<|tool_list_start|>")[1].split("<|tool_list_end|>")[0]) == tools
    text = call_text("f", '{"q": "x", "n": 1}')
    assert text == '<|tool_call_start|>[f(q="x", n=1)]<|tool_call_end|>'
    assert parse_tool_calls(text.removeprefix("<|tool_call_start|>").removesuffix("<|tool_call_end|>")) == [
        ("f", '{"q": "x", "n": 1}')
    ]
