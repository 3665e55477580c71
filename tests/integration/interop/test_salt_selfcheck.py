"""Self-check of the real-Salt harness (saltenv.py): stock salt-master 3008.5 + stock
salt-minion 3008.5 on loopback, key accepted with salt-key, `salt <id> test.ping` answers.

This proves the harness, not hamaster. The first run builds the cached venv (~1-2 min).
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import pytest

try:
    from tests.integration.interop import saltenv
except ImportError:  # rootdir not on sys.path: pytest put this directory there instead
    import saltenv  # type: ignore[no-redef]

pytestmark = [pytest.mark.interop, pytest.mark.timeout(900)]

VERSION = "3008.5"
MINION_ID = "selfcheck-minion"


@pytest.fixture(scope="module")
def salt_bin() -> Path:
    return saltenv.ensure_salt(VERSION)


@pytest.fixture(scope="module")
def workdir():
    # Short path: Salt's unix sockets live under it.
    d = Path(tempfile.mkdtemp(prefix="hsalt-selfcheck-"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="module")
def master(salt_bin, workdir):
    m = saltenv.SaltMasterProc(salt_bin, workdir / "master", interface="127.0.0.1")
    m.start()
    try:
        m.wait_ready(timeout=90)
        yield m
    finally:
        m.stop()


@pytest.fixture(scope="module")
def minion(salt_bin, workdir, master):
    mn = saltenv.SaltMinionProc(salt_bin, workdir / "minion", MINION_ID, master.address)
    mn.start()
    try:
        yield mn
    finally:
        mn.stop()


def test_stock_minion_answers_stock_master(master, minion):
    assert master.running, master.describe()
    master.accept_key(MINION_ID, timeout=90)
    try:
        master.ping(MINION_ID, timeout=120)
    except TimeoutError as exc:
        pytest.fail(f"{exc}\n{master.describe()}\n{minion.describe()}")
    assert "salt-minion" in minion.log_file.name or minion.log_file.exists()
    assert minion.log_text(), "minion wrote no debug log"
    keys = master.keys()
    assert MINION_ID in keys["minions"], keys
