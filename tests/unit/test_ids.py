"""The one rule for minion ids and jids, and how untrusted text is shown (hamaster.ids)."""

from __future__ import annotations

import pytest

from hamaster import ids


@pytest.mark.parametrize("mid", [
    "web1", "web-1.example.com", "a.b", "x" * ids.MAX_ID_BYTES, "é" * 120,
    "minion with space", "日本語のミニオン", "a_b@c:d",
])
def test_valid_ids(mid):
    assert ids.valid_minion_id(mid), ids.minion_id_problem(mid)
    assert ids.check_minion_id(mid) == mid


@pytest.mark.parametrize("mid,why", [
    ("", "non-empty"), (None, "non-empty"), (b"web1", "non-empty"),
    ("x" * (ids.MAX_ID_BYTES + 1), "bytes"),
    # within 255 characters but over 255 bytes: the id that made the fs store "fail"
    ("é" * 200, "bytes"), ("💥" * 64, "bytes"),
    ("a/b", "'/'"), ("a\\b", "'/'"), (".", "'.'"), ("..", "'.'"), (".hidden", "'.'"),
    ("a..b", "'..'"), ("a\0b", "non-printable"), ("a\nb", "non-printable"),
    ("a\x1b[31mb", "non-printable"), ("a\x7fb", "non-printable"), ("a\x85b", "non-printable"),
    ("a\u202eb", "non-printable"), ("a\u2028b", "non-printable"), ("a\ud800b", "Unicode"),
    (" web1", "whitespace"), ("web1 ", "whitespace"),
])
def test_invalid_ids(mid, why):
    problem = ids.minion_id_problem(mid)
    assert problem is not None and why in problem
    with pytest.raises(ValueError, match="invalid minion id"):
        ids.check_minion_id(mid)


@pytest.mark.parametrize("jid", [
    "20261206123456123456", "19700101000000000000", "20261206123456123456_4242",
])
def test_valid_jids(jid):
    assert ids.valid_jid(jid)
    assert ids.jid_time(jid).year in (1970, 2026)


@pytest.mark.parametrize("jid", [
    "00000000000000000000",  # 20 digits that are no time: used to poison job-cache expiry
    "20261399123456123456", "2026120612345612345", "202612061234561234567", "req", "",
    None, 20261206123456123456, "٢٠٢٦١٢٠٦١٢٣٤٥٦١٢٣٤٥٦", "20261206123456123456_",
    "2026120612345612345x",
    "20261206123456123456\n",
])
def test_invalid_jids(jid):
    assert not ids.valid_jid(jid)
    assert ids.jid_time(jid) is None
    with pytest.raises(ValueError, match="invalid jid"):
        ids.check_jid(jid)


def test_shown_plain_and_quoted():
    assert ids.shown("web1.example.com") == "web1.example.com"
    assert ids.shown("web 1") == "'web 1'"
    forged = "x\n2026-12-06 12:00:00 [hamaster][ERROR] forged\x1b[2J"
    out = ids.shown(forged)
    assert "\n" not in out and "\x1b" not in out and out.startswith("'")
    assert "\\n" in out and "\\x1b" in out
    assert ids.shown("a\u202eb") == "'a\\u202eb'"
    long = ids.shown("A" * 512 * 1024)
    assert len(long) < ids.SHOWN_MAX + 40 and long.endswith(f"...({512 * 1024} chars)")
    assert ids.shown(b"\x00ab") == "'\\x00ab'"
    assert ids.shown({"k": "\n" * 500}).endswith("chars)") and "\n" not in ids.shown({"k": "\n"})


def test_is_plain_only_for_shell_safe_text():
    assert ids.is_plain("web1") and ids.is_plain("web-1.example.com")
    for text in ("$(reboot)", "a b", "a;b", "-rf", "*", "a'b", "", "a`b`", "x" * 200):
        assert not ids.is_plain(text), text
