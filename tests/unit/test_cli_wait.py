"""Pieces of the CLI's salt-like waiting and output: batch sizes, the summary, the progress bar,
``find_job`` answers, a batch jid published again, jobs.active's StartTime."""

from __future__ import annotations

import io

import pytest

from hamaster.cli.salt import ProgressBar, no_return_text, summary_lines
from hamaster.jobs.jid import start_time
from hamaster.master.jobs import JobTracker
from hamaster.master.waiting import _running, batch_size


@pytest.mark.parametrize(("spec", "count", "size"), [
    ("2", 6, 2), ("10%", 30, 3), ("%10", 30, 3), ("50%", 5, 2), ("10%", 3, 1), ("100%", 7, 7),
])
def test_batch_size_like_salt(spec: str, count: int, size: int) -> None:
    assert batch_size(spec, count) == size


@pytest.mark.parametrize("spec", ["x", "0", "-1", "2.5", ""])
def test_bad_batch_size_has_salts_message(spec: str) -> None:
    with pytest.raises(ValueError, match="Data must be in the form of %10, 10% or 3"):
        batch_size(spec, 10)


def test_find_job_answers() -> None:
    assert _running({"return": {"jid": "1", "fun": "test.sleep"}, "retcode": 0})
    assert not _running({"return": {}, "retcode": 0})  # not running there
    assert not _running({"return": "'saltutil.find_job' is not available.", "retcode": 1})
    assert not _running({"return": {"return": {}}})
    assert not _running({"return": "some string"})


def test_summary_like_salt() -> None:
    results = {"a": (True, 0, None), "b": (False, 1, None), "c": ("x", 1, "No response"),
               "d": ("y", 1, "Not connected")}
    assert summary_lines(results, verbose=False) == [
        "\n", "-" * 43, "Summary", "-" * 43,
        "# of minions targeted: 4", "# of minions returned: 2",
        "# of minions that did not return: 2", "# of minions with errors: 1", "-" * 43,
    ]
    verbose = summary_lines(results, verbose=True)
    assert verbose[-4:] == ["Minions not connected: d", "Minions not responding: c",
                            "Minions with failures: b", "-" * 43]


def test_no_return_texts() -> None:
    assert no_return_text("Not connected", "1") == "Minion did not return. [Not connected]"
    text = no_return_text("No response", "20261206120000000001")
    assert text.startswith("Minion did not return. [No response]\nThe minions may not")
    assert text.endswith("\n\nhamaster-run jobs.lookup_jid 20261206120000000001")


def test_progress_bar_line() -> None:
    out = io.StringIO()
    bar = ProgressBar(out, 4)
    assert bar.line().startswith("  0% |" + " " * 30 + "| Elapsed Time: 0:00:00 Returns: [0/4]")
    bar.count = 2
    bar.draw()
    assert out.getvalue() == ("\r\033[K 50% |" + "#" * 15 + " " * 15
                              + "| Elapsed Time: 0:00:00 Returns: [2/4]")
    bar.count = 4
    bar.finish()
    assert out.getvalue().endswith("100% |" + "#" * 30 + "| Elapsed Time: 0:00:00 Returns: [4/4]\n")


def test_batch_jid_published_again_adds_minions_and_keeps_returns() -> None:
    tracker = JobTracker()
    jid = "20261206120000000001"
    tracker.add(jid, {"fun": "test.ping", "minions": ["a", "b"]}, ["a", "b"])
    tracker.add_return(jid, "a", {"return": True})
    rec = tracker.add(jid, {"fun": "test.ping", "minions": ["c"]}, ["c"])
    assert rec.minions == ["a", "b", "c"] and rec.load["minions"] == ["a", "b", "c"]
    assert rec.returns == {"a": {"return": True}}


def test_start_time_like_salt() -> None:
    assert start_time("20261206120502123456") == "2026, Dec 06 12:05:02.123456"
    assert start_time("20261206120502123456_3") == "2026, Dec 06 12:05:02.123456"
    assert start_time("nope") == "" and start_time("20261399120502123456") == ""
