"""Function calling in LFM2's tool format.

- Tools go into the system prompt: ``List of tools: <|tool_list_start|>[...]<|tool_list_end|>`` (a JSON
  list of ``{name, description, parameters}``), after the instructions.
- The model calls them in its text between ``<|tool_call_start|>`` and ``<|tool_call_end|>`` (special
  tokens): a Pythonic list of calls, ``[get_weather(city="Paris"), ...]``, or JSON
  (``[{"name": ..., "arguments": {...}}]``). ``parse_tool_calls`` turns either into (name, JSON arguments).
- Tool results go back as a ``tool`` turn: ``<|tool_response_start|>...<|tool_response_end|>``.
- A call made by the client (a ``function_call`` item it creates) is written as the assistant's turn
  in the same call syntax (``call_text``).
"""

from __future__ import annotations

import ast
import json

from lfm2audio.tokens import TOOL_CALL_END, TOOL_CALL_START

TOOL_LIST_START, TOOL_LIST_END = "<|tool_list_start|>", "<|tool_list_end|>"
TOOL_CALL_START_TEXT, TOOL_CALL_END_TEXT = "<|tool_call_start|>", "<|tool_call_end|>"
TOOL_RESPONSE_START, TOOL_RESPONSE_END = "<|tool_response_start|>", "<|tool_response_end|>"
CALL_TOKENS = (TOOL_CALL_START, TOOL_CALL_END)


class ToolCallError(ValueError):
    """The text between the tool call tokens is neither Pythonic calls nor JSON calls."""


def tool_system_prompt(instructions: str, tools: tuple[dict, ...] | list[dict]) -> str:
    listed = [
        {"name": t["name"], "description": t.get("description", ""), "parameters": t.get("parameters")} for t in tools
    ]
    return f"{instructions}\nList of tools: {TOOL_LIST_START}{json.dumps(listed)}{TOOL_LIST_END}"


def tool_response_text(output: str) -> str:
    return f"{TOOL_RESPONSE_START}{output}{TOOL_RESPONSE_END}"


def call_text(name: str, arguments: str) -> str:
    """A call as the model writes it (Pythonic), for a function_call item the client adds."""
    try:
        args = json.loads(arguments or "{}")
    except json.JSONDecodeError:
        args = {}
    kw = ", ".join(f"{k}={json.dumps(v)}" for k, v in (args.items() if isinstance(args, dict) else []))
    return f"{TOOL_CALL_START_TEXT}[{name}({kw})]{TOOL_CALL_END_TEXT}"


def parse_tool_calls(text: str) -> list[tuple[str, str]]:
    """``(name, arguments as a JSON object string)`` of each call in ``text``."""
    text = text.strip()
    if not text:
        return []
    if text[0] in "[{":
        try:
            data = json.loads(text)
        except json.JSONDecodeError:
            data = None
        if data is not None:
            calls = data if isinstance(data, list) else [data]
            out = []
            for c in calls:
                if not isinstance(c, dict) or not isinstance(c.get("name"), str):
                    raise ToolCallError(f"not a JSON tool call: {c!r}")
                args = c.get("arguments", c.get("parameters", {}))
                if isinstance(args, str):
                    args = json.loads(args)
                out.append((c["name"], json.dumps(args)))
            return out
    try:
        tree = ast.parse(text if text.startswith("[") else f"[{text}]", mode="eval")
    except SyntaxError as e:
        raise ToolCallError(f"tool call text is not Pythonic calls or JSON: {text!r}") from e
    if not isinstance(tree.body, ast.List):
        raise ToolCallError(f"expected a list of calls: {text!r}")
    out = []
    for node in tree.body.elts:
        if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Name | ast.Attribute):
            raise ToolCallError(f"not a function call: {ast.unparse(node)!r}")
        name = node.func.id if isinstance(node.func, ast.Name) else ast.unparse(node.func)
        try:
            args = {kw.arg: ast.literal_eval(kw.value) for kw in node.keywords if kw.arg is not None}
        except ValueError as e:
            raise ToolCallError(f"arguments of {name} are not literals") from e
        out.append((name, json.dumps(args)))
    return out
