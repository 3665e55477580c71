"""The ``test`` state module (Salt's ``test.succeed_*``, ``test.fail_*``, ``test.nop`` …)."""

from __future__ import annotations

from typing import Any

from hamaster.states.runner import StateRun

_CHANGES = {"testing": {"old": "Unchanged", "new": "Something pretended to change"}}


def nop(run: StateRun, name: str, **kwargs: Any) -> dict[str, Any]:
    """Do nothing; succeed without changes."""
    return succeed_without_changes(run, name)


def succeed_without_changes(run: StateRun, name: str, **kwargs: Any) -> dict[str, Any]:
    """Succeed, report no changes."""
    return {"name": name, "changes": {}, "result": True, "comment": "Success!"}


def succeed_with_changes(run: StateRun, name: str, **kwargs: Any) -> dict[str, Any]:
    """Succeed with a pretend change (``None`` in test mode)."""
    ret = {"name": name, "changes": dict(_CHANGES), "result": True, "comment": "Success!"}
    if run.test:
        ret["result"] = None
        ret["comment"] = "If we weren't testing, this would be successful with changes"
    return ret


def fail_without_changes(run: StateRun, name: str, **kwargs: Any) -> dict[str, Any]:
    """Fail, report no changes."""
    ret = {"name": name, "changes": {}, "result": False, "comment": "Failure!"}
    if run.test:
        ret["result"] = None
        ret["comment"] = "If we weren't testing, this would be a failure!"
    return ret


def fail_with_changes(run: StateRun, name: str, **kwargs: Any) -> dict[str, Any]:
    """Fail with a pretend change."""
    ret = {"name": name, "changes": dict(_CHANGES), "result": False, "comment": "Failure!"}
    if run.test:
        ret["result"] = None
        ret["comment"] = "If we weren't testing, this would be failed with changes"
    return ret


def show_notification(run: StateRun, name: str, text: str | None = None,
                      **kwargs: Any) -> dict[str, Any]:
    """Show ``text`` as the comment."""
    return {"name": name, "changes": {}, "result": True, "comment": text or ""}


def mod_watch(run: StateRun, name: str, sfun: str | None = None,
              **kwargs: Any) -> dict[str, Any]:
    """Fired by a ``watch`` requisite whose target changed."""
    return {"name": name, "changes": {"Requisites with changes": []}, "result": True,
            "comment": "Watch statement fired."}
