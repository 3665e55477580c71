"""CLI outputters render returns the way Salt's do."""

from __future__ import annotations

import json

import pytest
import yaml

from hamaster.output import render, to_plain


def test_nested_scalar() -> None:
    assert render({"web1": True}, "nested") == "web1:\n    True"
    assert render({"web1": None}, "nested") == "web1:\n    None"


def test_nested_dict_and_list_layout() -> None:
    data = {"web1": {"pid": 12, "stdout": "a\nb", "stderr": "", "list": [1, "x"],
                     "sub": {"k": "v"}}}
    assert render(data, "nested") == "\n".join([
        "web1:",
        "    ----------",
        "    list:",
        "        - 1",
        "        - x",
        "    pid:",
        "        12",
        "    stderr:",
        "    stdout:",
        "        a",
        "        b",
        "    sub:",
        "        ----------",
        "        k:",
        "            v",
    ])


def test_nested_list_of_dicts_and_lists() -> None:
    assert render({"m": [{"a": 1}, [2, 3]]}, "nested") == "\n".join([
        "m:",
        "    |_",
        "      ----------",
        "      a:",
        "          1",
        "    |_",
        "      - 2",
        "      - 3",
    ])


def test_nested_multiline_string_under_list_item_keeps_alignment() -> None:
    assert render({"m": ["one\ntwo"]}, "nested") == "m:\n    - one\n      two"


def test_nested_several_minions_sorted() -> None:
    assert render({"b": 1, "a": 2}, "nested") == "a:\n    2\nb:\n    1"


def test_nested_color_only_when_asked() -> None:
    assert "\033[" not in render({"m": {"k": "v"}}, "nested")
    colored = render({"m": {"k": "v"}}, "nested", color=True)
    assert "\033[0;36m" in colored and colored.endswith("\033[0m")
    assert "\033[0;31m" in render({"m": {"k": "v"}}, "nested", color=True, retcode=1)


def test_json_static_and_streaming() -> None:
    data = {"web1": {"a": [1, 2]}, "web2": True}
    static = render(data, "json", static=True)
    assert json.loads(static) == data
    assert static.startswith('{\n    "web1"')  # indent 4 like Salt
    parts = render(data, "json").split("\n}\n")
    assert len(parts) == 2
    assert json.loads(parts[0] + "\n}") == {"web1": {"a": [1, 2]}}
    assert json.loads(parts[1]) == {"web2": True}


def test_json_handles_bytes_and_odd_values() -> None:
    class Odd:
        def __str__(self) -> str:
            return "odd!"

    out = json.loads(render({"m": {"b": b"caf\xc3\xa9 \xff", "o": Odd(), "t": (1, 2),
                                   ("x", 1): "tuple key"}}, "json", static=True))
    assert out["m"]["b"] == "café \ufffd"
    assert out["m"]["o"] == "odd!"
    assert out["m"]["t"] == [1, 2]
    assert out["m"]["('x', 1)"] == "tuple key"


def test_yaml() -> None:
    data = {"web1": {"a": [1, 2], "b": b"bytes"}}
    text = render(data, "yaml")
    assert yaml.safe_load(text) == {"web1": {"a": [1, 2], "b": "bytes"}}
    assert "{" not in text  # block style


def test_txt() -> None:
    assert render({"m": "one\ntwo", "n": {"a": 1}}, "txt") == "m: one\nm: two\nn: {'a': 1}"
    assert render({"m": ""}, "txt") == "m: "


def test_raw_is_repr() -> None:
    assert render({"m": {"a": b"x"}}, "raw") == "{'m': {'a': b'x'}}"


def test_quiet_and_unknown() -> None:
    assert render({"m": 1}, "quiet") == ""
    with pytest.raises(ValueError, match="unknown output format"):
        render({"m": 1}, "fancy")


def test_to_plain_sets_sorted() -> None:
    assert to_plain({"s": {3, 1, 2}}) == {"s": [1, 2, 3]}
