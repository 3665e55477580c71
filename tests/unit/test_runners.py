"""Runners called with a RunnerContext built from real parts (an fs store, the job cache, the
job tracker, a blob cache): no Master is needed to run one."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from hamaster.fileroots.manifest import BlobCache
from hamaster.jobs.cache import JobCache
from hamaster.master.jobs import JobTracker
from hamaster.master.runners import RunnerContext, RunnerError, run_runner
from hamaster.pki_sync.keys import KeyRegistry
from hamaster.store.fs import FsStore

JID_CACHED = "20261206120000000001"
JID_MEMORY = "20261206120000000002"


def _no_publish(*args: object, **kwargs: object) -> dict:
    raise AssertionError("these runners must not publish")


async def _no_status() -> dict:
    raise AssertionError("not asked")


@pytest.fixture
def ctx(tmp_path: Path):
    store = FsStore(tmp_path / "store")
    cache = JobCache(store)
    tracker = JobTracker()
    cache.save_load(JID_CACHED, {"fun": "test.ping", "arg": [], "tgt": "*", "tgt_type": "glob",
                                 "user": "root"})
    cache.save_return(JID_CACHED, "m1", {"return": True})
    tracker.add(JID_MEMORY, {"fun": "cmd.run", "arg": ["id"], "tgt": "m2", "tgt_type": "glob",
                             "user": "root", "_stamp": "2026-12-06T12:00:00"}, ["m2", "m3"])
    tracker.add_return(JID_MEMORY, "m2", {"return": "uid=0"})
    yield RunnerContext(
        opts={"timeout": 1}, master_id="master1", store=store, keys=KeyRegistry(store, "pki"),
        job_cache=cache, tracker=tracker, publish=_no_publish, grains={},
        compile_pillar=lambda mid, grains, env: {"compiled_for": mid, "env": env},
        blob_cache=BlobCache(tmp_path / "blobs"), cluster_status=_no_status)
    store.close()


def run(ctx: RunnerContext, fun: str, *args: object, **kwargs: object) -> object:
    return asyncio.run(run_runner(ctx, fun, list(args), dict(kwargs)))


def test_jobs_runners_read_the_cache_and_the_tracker(ctx: RunnerContext) -> None:
    jobs = run(ctx, "jobs.list_jobs")
    assert list(jobs) == [JID_CACHED, JID_MEMORY]
    assert jobs[JID_MEMORY]["Function"] == "cmd.run"
    assert run(ctx, "jobs.lookup_jid", JID_MEMORY, missing=True) == {
        "m2": "uid=0", "m3": "Minion did not return. [No response]"}
    assert run(ctx, "jobs.lookup_jid", JID_CACHED) == {"m1": True}
    assert run(ctx, "jobs.print_job", JID_MEMORY)[JID_MEMORY]["Target"] == "m2"


def test_fileroots_and_pillar_runners_use_only_the_context(ctx: RunnerContext,
                                                           tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "motd").write_text("hello\n")
    assert run(ctx, "fileroots.push", str(src))["files"] == 1
    listing = run(ctx, "fileroots.list")
    assert listing["base"]["motd"]["present"] is True
    assert run(ctx, "pillar.show_pillar", "m1", pillarenv="dev") == {"compiled_for": "m1",
                                                                    "env": "dev"}


def test_misuse_is_a_runner_error(ctx: RunnerContext) -> None:
    with pytest.raises(RunnerError, match="not available"):
        run(ctx, "no.such")
    with pytest.raises(RunnerError, match="invalid arguments"):
        run(ctx, "jobs.lookup_jid")
    lone = RunnerContext(**{**ctx.__dict__, "store": None, "blob_cache": None})
    with pytest.raises(RunnerError, match="clustered master"):
        run(lone, "fileroots.push", "/nonexistent")
    assert run(lone, "fileroots.list") == {}
