"""Targeting behaves like Salt's: every target type, compound precedence and malformed input."""

from __future__ import annotations

import pytest

from hamaster.targeting import check_minions, matches

GRAINS = {
    "os": "Ubuntu",
    "os_family": "Debian",
    "osmajorrelease": 22,
    "roles": ["web", "cache"],
    "virtual": True,
    "ipv4": ["127.0.0.1", "10.1.2.3"],
    "ip_interfaces": {"eth0": ["10.1.2.3"]},
    "pkg": {"apache": "httpd"},
    "url": "http://example.com:8080",
}


# ------------------------------------------------------------------ id-based


@pytest.mark.parametrize(("tgt", "mid", "expected"), [
    ("*", "web1", True),
    ("web*", "web1", True),
    ("web?", "web12", False),
    ("web[12]", "web2", True),
    ("WEB*", "web1", False),  # case-sensitive like Salt
    ("db*", "web1", False),
])
def test_glob(tgt: str, mid: str, expected: bool) -> None:
    assert matches(tgt, "glob", mid, {}) is expected


def test_list_as_string_and_list() -> None:
    assert matches("a,web1, b", "list", "web1", {})
    assert matches(["a", "web1"], "list", "web1", {})
    assert not matches("web10,web11", "list", "web1", {})
    assert not matches([], "list", "web1", {})


def test_pcre_is_anchored_at_start_only() -> None:
    assert matches(r"web\d", "pcre", "web12", {})  # re.match: no end anchor
    assert not matches(r"eb\d", "pcre", "web1", {})
    assert matches(r"web\d$", "pcre", "web1", {})
    assert not matches(r"web\d$", "pcre", "web12", {})


def test_bad_regex_is_value_error() -> None:
    with pytest.raises(ValueError, match="invalid regular expression"):
        matches("web(", "pcre", "web1", {})


# ------------------------------------------------------------------ grains


@pytest.mark.parametrize(("tgt", "expected"), [
    ("os:Ubuntu", True),
    ("os:ubuntu", True),           # value match ignores case
    ("os:Ubu*", True),
    ("os:Debian", False),
    ("roles:web", True),           # list grain: any element
    ("roles:db", False),
    ("osmajorrelease:22", True),   # non-string values compared as str
    ("virtual:true", True),
    ("pkg:apache:httpd", True),    # nested key
    ("pkg:apache:nginx", False),
    ("pkg:apache", True),          # dict value: matches a key
    ("ip_interfaces:eth0:10.1.*", True),
    ("url:http://example.com:8080", True),  # value containing the delimiter
    ("missing:x", False),
])
def test_grain(tgt: str, expected: bool) -> None:
    assert matches(tgt, "grain", "web1", GRAINS) is expected


def test_grain_custom_delimiter() -> None:
    assert matches("pkg|apache|httpd", "grain", "web1", GRAINS, delimiter="|")
    assert not matches("pkg|apache|nginx", "grain", "web1", GRAINS, delimiter="|")


def test_grain_without_value_is_value_error() -> None:
    with pytest.raises(ValueError, match="key:value"):
        matches("os", "grain", "web1", GRAINS)


def test_grain_pcre() -> None:
    assert matches("os:(Ubuntu|Debian)", "grain_pcre", "web1", GRAINS)
    assert matches("os:ubu", "grain_pcre", "web1", GRAINS)  # case-insensitive, start anchor
    assert not matches("os:buntu", "grain_pcre", "web1", GRAINS)
    assert matches("roles:ca.he", "grain_pcre", "web1", GRAINS)


def test_ipcidr() -> None:
    assert matches("10.1.0.0/16", "ipcidr", "web1", GRAINS)
    assert not matches("192.168.0.0/16", "ipcidr", "web1", GRAINS)
    with pytest.raises(ValueError, match="ipcidr"):
        matches("not-a-net", "ipcidr", "web1", GRAINS)


# ------------------------------------------------------------------ compound


@pytest.mark.parametrize(("tgt", "mid", "expected"), [
    ("web*", "web1", True),
    ("G@os:Ubuntu and web*", "web1", True),
    ("G@os:Ubuntu and db*", "web1", False),
    ("G@os:Debian or web*", "web1", True),
    ("not db*", "web1", True),
    ("not web*", "web1", False),
    ("web* and not G@roles:db", "web1", True),
    ("web* not G@roles:web", "web1", False),  # Salt: 'not' after an operand means 'and not'
    ("L@db1,web1 and E@web\\d", "web1", True),
    ("P@os:ubu.* and I@role:x", "web1", False),  # pillar terms never match
    ("J@role:x or web1", "web1", True),
    ("S@10.1.0.0/16 and web1", "web1", True),
    ("G|@pkg|apache|httpd and web1", "web1", True),  # per-term delimiter
    ("E@web(1|2) and web*", "web1", True),  # parens inside a regex are not grouping
])
def test_compound_terms(tgt: str, mid: str, expected: bool) -> None:
    assert matches(tgt, "compound", mid, GRAINS) is expected


def test_compound_precedence_and_binds_tighter_than_or() -> None:
    # a or (b and c): true because "web1" matches the first alternative
    assert matches("web1 or db* and G@os:Debian", "compound", "web1", GRAINS)
    # if it were (a or b) and c it would be false
    assert not matches("(web1 or db*) and G@os:Debian", "compound", "web1", GRAINS)


def test_compound_not_binds_tighter_than_and() -> None:
    # (not db1) and web1 -> True; not (db1 and web1) would also be True, so check the other way
    assert not matches("not web1 and web1", "compound", "web1", GRAINS)
    assert matches("not (web1 and db1)", "compound", "web1", GRAINS)
    assert matches("not not web1", "compound", "web1", GRAINS)


def test_compound_parens_attached_to_words() -> None:
    assert matches("(web1 or db1) and (G@os:Ubuntu)", "compound", "web1", GRAINS)
    assert matches("((web1))", "compound", "web1", GRAINS)
    assert not matches("(db1 or (web2 and web*))", "compound", "web1", GRAINS)
    assert matches("( E@web(1|2) )", "compound", "web1", GRAINS)
    assert matches("(E@web(1|2))", "compound", "web1", GRAINS)


@pytest.mark.parametrize(("tgt", "message"), [
    ("", "empty"),
    ("(web1", "unbalanced '\\('"),
    ("web1)", "unbalanced '\\)'"),
    ("web1 and", "ends with an operator"),
    ("and web1", "missing an operand"),
    ("web1 or or db1", "missing an operand"),
    ("web1 db1", "missing 'and'/'or'"),
    ("()", "unexpected '\\)'"),
    ("not", "ends with an operator"),
    ("N@group", "nodegroup"),
    ("X@foo", "unknown target engine"),
    ("E@web(", "invalid regular expression"),
    ("G@os", "key:value"),
])
def test_malformed_compound_raises_value_error(tgt: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        matches(tgt, "compound", "web1", GRAINS)


def test_malformed_term_detected_even_when_short_circuited() -> None:
    with pytest.raises(ValueError):
        matches("web1 or E@(", "compound", "web1", GRAINS)


def test_unknown_type_and_nodegroup_are_value_errors() -> None:
    with pytest.raises(ValueError, match="unknown target type"):
        matches("x", "bogus", "web1", {})
    with pytest.raises(ValueError, match="nodegroup"):
        matches("group1", "nodegroup", "web1", {})


def test_pillar_types_never_match() -> None:
    assert not matches("role:web", "pillar", "web1", GRAINS)


# ------------------------------------------------------------------ check_minions


def _grains_of(table: dict[str, dict | None]):
    return lambda mid: table.get(mid)


def test_check_minions_id_targets_include_unknown_grains() -> None:
    table = {"web1": GRAINS, "web2": None, "db1": None}
    ids = ["web1", "web2", "db1"]
    assert check_minions("web*", "glob", ids, _grains_of(table)) == ["web1", "web2"]
    assert check_minions("db1,web2", "list", ids, _grains_of(table)) == ["web2", "db1"]
    assert check_minions("^db", "pcre", ids, _grains_of(table)) == ["db1"]


def test_check_minions_grain_targets_exclude_unknown_grains() -> None:
    table = {"web1": GRAINS, "web2": None, "db1": {"os": "CentOS"}}
    ids = ["web1", "web2", "db1"]
    assert check_minions("os:Ubuntu", "grain", ids, _grains_of(table)) == ["web1"]
    assert check_minions("web* or G@os:CentOS", "compound", ids, _grains_of(table)) == [
        "web1", "db1"]


def test_check_minions_validates_target_even_without_minions() -> None:
    with pytest.raises(ValueError):
        check_minions("web1 and", "compound", [], lambda _mid: None)
