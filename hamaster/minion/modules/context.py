"""The explicit context handed to every execution-module function (no ``__opts__`` globals)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from hamaster.minion.modules.registry import FunctionRegistry

#: ``(salt:// path, saltenv) -> file content or None when the master has no such file``.
FetchFile = Callable[[str, str], "bytes | None"]


class CommandExecutionError(Exception):
    """A module function could not do its job; the message is shown to the operator."""


@dataclass
class ExecContext:
    """What a module function may know about the minion and the job it runs for.

    A function fails the job by setting ``retcode`` to a non-zero value (Salt's
    ``__context__['retcode']``); the executor resets it to 0 before each call.
    """

    opts: dict[str, Any]
    grains: dict[str, Any]
    minion_id: str
    jid: str | None = None
    retcode: int = 0
    pillar: dict[str, Any] = field(default_factory=dict)
    fetch_file: FetchFile | None = None
    registry: FunctionRegistry | None = None
    #: ``(tag, data) -> sent``: send an event to the masters (``event.send``).
    fire_master: Callable[[str, Any], bool] | None = None
    #: Jobs the minion is running now, by jid (``saltutil.find_job`` / ``saltutil.running``).
    running_jobs: Mapping[str, dict[str, Any]] = field(default_factory=dict)
    #: Fetch a fresh pillar from a master, keep it for later jobs and return it (pillar.refresh).
    refresh_pillar: Callable[[], dict[str, Any]] | None = None
    #: Send one aes request load to a live master and return its answer (mine.*).
    master_request: Callable[[dict[str, Any]], Any] | None = None
