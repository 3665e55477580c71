"""The executor: CLI argument parsing, publication args, and Salt-shaped failures."""

from __future__ import annotations

from typing import Any

import pytest

from hamaster.minion.executor import (
    CommandExecutionError,
    ExecResult,
    execute,
    parse_cli_args,
    split_args,
)
from hamaster.minion.modules.context import ExecContext
from hamaster.minion.modules.registry import FunctionRegistry


@pytest.fixture(scope="module")
def registry() -> FunctionRegistry:
    return FunctionRegistry()


@pytest.fixture
def ctx(registry: FunctionRegistry) -> ExecContext:
    return ExecContext(opts={}, grains={"os": "Ubuntu"}, minion_id="web1", registry=registry)


# ------------------------------------------------------------------ parse_cli_args


@pytest.mark.parametrize(("word", "expected"), [
    ("1", 1),
    ("1.5", 1.5),
    ("true", True),
    ("null", None),
    ("None", None),
    ("hello", "hello"),
    ("[1, 2]", [1, 2]),
    ("{a: 1}", {"a": 1}),
    ("a: 1", "a: 1"),          # unbraced mapping stays a string
    ("- a", "- a"),            # unbracketed list stays a string
    ("echo # hi", "echo # hi"),  # '#' would be a YAML comment
    ("!", "!"),
    ("|", "|"),
    ("2024-01-02", "2024-01-02"),  # dates stay strings
    ("[unclosed", "[unclosed"),    # YAML error keeps the string
    ("", ""),
])
def test_positional_args_are_yaml_parsed(word: str, expected: Any) -> None:
    assert parse_cli_args([word]) == [expected]


def test_kwargs_collected_into_one_trailing_dict() -> None:
    assert parse_cli_args(["a", "x=1", "2", "y=[1, 2]", "z=hello world", "e="]) == [
        "a", 2, {"__kwarg__": True, "x": 1, "y": [1, 2], "z": "hello world", "e": ""}]


def test_non_identifier_key_stays_positional() -> None:
    assert parse_cli_args(["1=2", "a b=c", "=x", "a==b", "ls -l --color=auto"]) == [
        "1=2", "a b=c", "=x", "a==b", "ls -l --color=auto"]


def test_value_may_contain_equals_and_salt_style_keys() -> None:
    assert parse_cli_args(["cmd=echo a=b", "pkg.name=x"]) == [
        {"__kwarg__": True, "cmd": "echo a=b", "pkg.name": "x"}]


def test_no_kwargs_no_trailing_dict() -> None:
    assert parse_cli_args(["a", "b"]) == ["a", "b"]


# ------------------------------------------------------------------ split_args


def test_split_args() -> None:
    args, kwargs = split_args(["a", {"__kwarg__": True, "x": 1}, {"plain": "dict"}])
    assert args == ["a", {"plain": "dict"}]
    assert kwargs == {"x": 1}
    assert split_args([]) == ([], {})
    assert split_args(None) == ([], {})


def test_split_args_roundtrip_with_parse() -> None:
    assert split_args(parse_cli_args(["1", "k=v"])) == ([1], {"k": "v"})


# ------------------------------------------------------------------ execute


def test_execute_success(registry: FunctionRegistry, ctx: ExecContext) -> None:
    res = execute(registry, ctx, "test.echo", ["hi"])
    assert res == ExecResult("hi", 0, True)


def test_execute_unknown_function(registry: FunctionRegistry, ctx: ExecContext) -> None:
    res = execute(registry, ctx, "test.nope", [])
    assert res.ret == "'test.nope' is not available."
    assert res.retcode == 1 and res.success is False and res.error == "unavailable"


def test_execute_bad_arguments(registry: FunctionRegistry, ctx: ExecContext) -> None:
    res = execute(registry, ctx, "test.echo", [])
    assert res.ret.startswith("Passed invalid arguments to test.echo: ")
    assert "missing a required argument: 'text'" in res.ret
    assert "\n\nUsage:\nReturn ``text`` unchanged." in res.ret
    assert (res.retcode, res.success, res.error) == (1, False, "invalid_args")

    res = execute(registry, ctx, "test.ping", [{"__kwarg__": True, "bogus": 1}])
    assert "unexpected keyword argument 'bogus'" in res.ret
    assert res.error == "invalid_args"


def _raises_type_error(ctx: ExecContext, x: int) -> None:
    """Raise a TypeError from inside the function."""
    raise TypeError("inner problem")


def _raises_cee(ctx: ExecContext) -> None:
    """Raise a CommandExecutionError."""
    raise CommandExecutionError("disk is full")


def _kw(ctx: ExecContext, a: int = 0) -> int:
    """No **kwargs: must not receive __pub_* keys."""
    return a


def test_execute_exception_is_a_return_not_a_raise(registry: FunctionRegistry,
                                                   ctx: ExecContext) -> None:
    res = execute(registry, ctx, "test.exception", ["boom"])
    assert res.ret == "The minion function caused an exception: Exception: boom"
    assert "Traceback" not in res.ret
    assert (res.retcode, res.success, res.error) == (1, False, "exception")


def test_type_error_inside_function_is_an_exception_not_bad_args(ctx: ExecContext) -> None:
    reg = FunctionRegistry(modules=())
    reg.register("x.te", _raises_type_error)
    reg.register("x.cee", _raises_cee)
    res = execute(reg, ctx, "x.te", [1])
    assert res.ret == "The minion function caused an exception: TypeError: inner problem"
    assert res.error == "exception"
    res = execute(reg, ctx, "x.cee", [])
    assert res.ret == "ERROR: disk is full" and res.retcode == 1


def test_retcode_set_by_function(registry: FunctionRegistry, ctx: ExecContext) -> None:
    res = execute(registry, ctx, "test.retcode", [3])
    assert (res.ret, res.retcode, res.success, res.error) == (3, 3, False, None)
    # the context's retcode is reset for the next call
    assert execute(registry, ctx, "test.ping", []).retcode == 0


PUB = {"fun": "test.arg", "jid": "20240101000000000000", "tgt": "*", "tgt_type": "glob",
       "arg": [1], "user": "root", "ret": "ignored"}


def test_pub_kwargs_only_for_var_kwargs_functions(registry: FunctionRegistry,
                                                  ctx: ExecContext) -> None:
    res = execute(registry, ctx, "test.arg", [1, {"__kwarg__": True, "k": "v"}], PUB)
    assert res.ret["args"] == [1]
    assert res.ret["kwargs"] == {
        "k": "v", "__pub_fun": "test.arg", "__pub_jid": "20240101000000000000",
        "__pub_tgt": "*", "__pub_tgt_type": "glob", "__pub_arg": [1], "__pub_user": "root"}

    reg = FunctionRegistry(modules=())
    reg.register("x.kw", _kw)
    res = execute(reg, ctx, "x.kw", [5], PUB)
    assert res == ExecResult(5, 0, True)
