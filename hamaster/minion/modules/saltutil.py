"""``saltutil.find_job`` and ``saltutil.running``: the jobs this minion is running now.

Salt's CLI depends on them: when a minion has not returned within the CLI's timeout, it
publishes ``saltutil.find_job JID`` to the minions still missing and keeps waiting for those
that report the job as running (an empty mapping means "not running here"). The minion daemon
keeps the table of running jobs and hands it to these functions as ``ctx.running_jobs``.
"""

from __future__ import annotations

from typing import Any

from hamaster.minion.modules.context import ExecContext


def find_job(ctx: ExecContext, jid: Any) -> dict[str, Any]:
    """The data of job ``jid`` if this minion is running it now, else ``{}``.

    CLI Example: ``hamaster '*' saltutil.find_job 20261206120000123456``
    """
    return dict(ctx.running_jobs.get(str(jid), {}))


def running(ctx: ExecContext) -> list[dict[str, Any]]:
    """The data of every job this minion is running now (``fun``, ``arg``, ``jid``, ``pid``…).

    CLI Example: ``hamaster '*' saltutil.running``
    """
    return [dict(job) for job in ctx.running_jobs.values()]


def refresh_pillar(ctx: ExecContext, wait: bool = True, **kwargs: Any) -> bool:
    """Fetch this minion's pillar again from a master and keep it for later jobs.

    The same as ``pillar.refresh`` (hamaster/minion/modules/pillar.py). ``wait`` is accepted for
    Salt's signature; the refresh is always done before returning.

    CLI Example: ``hamaster '*' saltutil.refresh_pillar``
    """
    from hamaster.minion.modules.pillar import refresh

    return refresh(ctx)
