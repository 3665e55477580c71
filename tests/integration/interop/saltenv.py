"""Real Salt from PyPI, as a peer for interop tests.

* :func:`ensure_salt` installs a pinned Salt release into a cached virtual environment
  *outside* the repository and returns its ``bin`` directory.
* :class:`SaltMasterProc` / :class:`SaltMinionProc` run stock ``salt-master`` /
  ``salt-minion`` daemons from such a venv with a private config dir and ``root_dir``.

Cache location: ``$HAMASTER_SALT_CACHE`` or ``/var/cache/hamaster-interop``; one venv per
version at ``<cache>/salt-<version>``.  A venv is reused when its marker file
(``.hamaster-complete``) exists and ``bin/salt-minion --version`` reports the version.

Why the fallback build exists (see docs/TEST-INFRA.md, "Real Salt, as a peer"): current Salt
releases declare ``certifi>=2026.10.23`` while the index's newest certifi is older, so a plain
``pip install salt==V`` cannot resolve.  The fallback takes the ``Requires-Dist`` list from the
sdist's PKG-INFO, drops only the lower bound of the requirement(s) pip reports as unsatisfiable,
installs that list (pip evaluates the environment markers), then ``pip install --no-deps salt==V``.

This module does not import pytest.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import pwd
import re
import shutil
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from tests.kit import free_ports, stop_group, wait_until

log = logging.getLogger("hamaster.interop.saltenv")

#: Pinned Salt releases used by the interop tests: the requested 3008 release and the newest
#: 3007.x and 3006.x releases on PyPI (checked with ``pip index versions salt``).
SALT_VERSIONS: list[str] = ["3008.5", "3007.17", "3006.30"]

#: Console scripts every cached venv must provide.
SALT_SCRIPTS: tuple[str, ...] = (
    "salt-minion",
    "salt-master",
    "salt-key",
    "salt",
    "salt-run",
    "salt-call",
)

DEFAULT_CACHE_DIR = Path("/var/cache/hamaster-interop")
MARKER_NAME = ".hamaster-complete"
BUILD_LOG_NAME = "hamaster-build.log"
PIP_TIMEOUT = 1800.0  # seconds, per pip invocation
_MAX_RELAX_ROUNDS = 6

# Versions verified in this process already (skip re-running `salt-minion --version`).
_VERIFIED: dict[Path, str] = {}


# --------------------------------------------------------------------------------------------
# venv cache
# --------------------------------------------------------------------------------------------


def cache_dir() -> Path:
    """The venv cache root (created if missing)."""
    env = os.environ.get("HAMASTER_SALT_CACHE")
    root = Path(env) if env else DEFAULT_CACHE_DIR
    try:
        root.mkdir(parents=True, exist_ok=True)
    except PermissionError:
        if env:
            raise
        root = Path.home() / ".cache" / "hamaster-interop"
        log.warning("cannot create %s; using %s", DEFAULT_CACHE_DIR, root)
        root.mkdir(parents=True, exist_ok=True)
    return root


def venv_dir(version: str) -> Path:
    """Where the venv of ``version`` lives (whether or not it is built yet)."""
    return cache_dir() / f"salt-{version}"


def ensure_salt(version: str) -> Path:
    """Return the ``bin`` dir of a venv holding ``salt==version``, building it if needed.

    Safe to call from concurrent processes: builds are serialised with an ``fcntl`` lock and
    a venv is built in a temporary directory, then renamed into place.
    Raises :class:`RuntimeError` (with the tail of pip's output) when the build fails.
    """
    if not re.fullmatch(r"[0-9][0-9A-Za-z.+-]*", version):
        raise ValueError(f"not a Salt version: {version!r}")
    root = cache_dir()
    final = root / f"salt-{version}"
    if _is_complete(final, version):
        return final / "bin"
    lock_path = root / f".salt-{version}.lock"
    with open(lock_path, "a+") as lock_file:
        t_wait = time.monotonic()
        try:
            fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info(
                "salt %s: another process is building %s; waiting for its lock", version, final
            )
            fcntl.flock(lock_file, fcntl.LOCK_EX)
            log.info("salt %s: got the build lock after %.1f s", version, time.monotonic() - t_wait)
        try:
            if _is_complete(final, version):  # built by whoever held the lock
                return final / "bin"
            _build(version, root, final)
            if not _is_complete(final, version):
                raise RuntimeError(
                    f"salt {version}: venv built at {final} but `salt-minion --version` "
                    f"does not report {version}; see {final / BUILD_LOG_NAME}"
                )
            return final / "bin"
        finally:
            fcntl.flock(lock_file, fcntl.LOCK_UN)


def _is_complete(venv: Path, version: str) -> bool:
    if _VERIFIED.get(venv) == version:
        return True
    marker = venv / MARKER_NAME
    try:
        info = json.loads(marker.read_text())
    except (OSError, ValueError):
        return False
    if info.get("version") != version:
        return False
    bindir = venv / "bin"
    if not all((bindir / s).exists() for s in SALT_SCRIPTS):
        return False
    try:
        r = subprocess.run(
            [str(bindir / "salt-minion"), "--version"],
            capture_output=True,
            text=True,
            timeout=120,
            env=_clean_env(),
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        log.warning("salt %s: cached venv %s does not run: %s", version, venv, exc)
        return False
    out = (r.stdout + r.stderr).strip()
    if r.returncode != 0 or version not in out.split():
        log.warning(
            "salt %s: cached venv %s is broken (`salt-minion --version` rc=%s: %s)",
            version,
            venv,
            r.returncode,
            out[-500:],
        )
        return False
    _VERIFIED[venv] = version
    return True


class _BuildLog:
    """Collects the output of every command of one build (written to the venv later)."""

    def __init__(self, version: str) -> None:
        self.version = version
        self.parts: list[str] = []

    def run(
        self, argv: Sequence[str], *, cwd: Path | None = None, timeout: float = PIP_TIMEOUT
    ) -> subprocess.CompletedProcess[str]:
        t0 = time.monotonic()
        log.info("salt %s: $ %s", self.version, " ".join(map(str, argv)))
        try:
            r = subprocess.run(
                [str(a) for a in argv],
                cwd=cwd,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                timeout=timeout,
                env=_pip_env(),
            )
        except subprocess.TimeoutExpired as exc:
            out = (
                exc.stdout.decode(errors="replace")
                if isinstance(exc.stdout, bytes)
                else (exc.stdout or "")
            )
            r = subprocess.CompletedProcess(
                list(argv), -1, out + f"\n[timed out after {timeout} s]\n"
            )
        dt = time.monotonic() - t0
        self.parts.append(
            f"$ {' '.join(map(str, argv))}\n{r.stdout}\n[rc={r.returncode}, {dt:.1f} s]\n"
        )
        log.info("salt %s: rc=%s after %.1f s", self.version, r.returncode, dt)
        return r

    def text(self) -> str:
        return "\n".join(self.parts)


def _tail(text: str, lines: int = 40) -> str:
    # Drop pip's noise about the local file:// indexes that do not exist on every machine.
    kept = [ln for ln in text.splitlines() if "is ignored: it is neither a file nor" not in ln]
    return "\n".join(kept[-lines:])


def _build(version: str, root: Path, final: Path) -> None:
    t0 = time.monotonic()
    blog = _BuildLog(version)
    work = Path(tempfile.mkdtemp(prefix=f".build-salt-{version}-", dir=root))
    venv = work / "venv"
    log.info("salt %s: building venv in %s (python %s)", version, venv, _python())
    relaxed: dict[str, str] = {}
    method = "plain"
    try:
        _make_venv(venv, blog)
        py = venv / "bin" / "python"
        plain = blog.run([py, "-m", "pip", "install", f"salt=={version}"])
        if plain.returncode != 0:
            method = "relaxed"
            bad = _unsatisfiable(plain.stdout)
            log.warning(
                "salt %s: plain `pip install salt==%s` failed (%s); falling back to the "
                "sdist's Requires-Dist list with relaxed floor(s)",
                version,
                version,
                ", ".join(sorted(bad)) or "no unsatisfiable requirement named",
            )
            if "Installing collected packages" in plain.stdout:
                # It failed after installing something: start again from a clean venv.
                shutil.rmtree(venv)
                _make_venv(venv, blog)
            relaxed = _relaxed_install(version, py, work, blog, bad or {"certifi"})
        _check_scripts(venv, version, blog)
        freeze = blog.run([py, "-m", "pip", "freeze", "--all"]).stdout
        elapsed = time.monotonic() - t0
        (venv / BUILD_LOG_NAME).write_text(blog.text())
        (venv / MARKER_NAME).write_text(
            json.dumps(
                {
                    "version": version,
                    "method": method,
                    "relaxed": relaxed,
                    "python": _python(),
                    "built_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                    "build_seconds": round(elapsed, 1),
                    "freeze": freeze.splitlines(),
                },
                indent=2,
            )
            + "\n"
        )
        _relocate(venv, final)
        if final.exists() or final.is_symlink():
            stale = Path(tempfile.mkdtemp(prefix=f".stale-salt-{version}-", dir=root))
            os.rename(final, stale / "venv")
            log.info("salt %s: moved incomplete/broken %s aside to %s", version, final, stale)
            shutil.rmtree(stale, ignore_errors=True)
        os.rename(venv, final)
        log.info(
            "salt %s: venv ready at %s (%s install%s) in %.1f s",
            version,
            final,
            method,
            f", relaxed {relaxed}" if relaxed else "",
            elapsed,
        )
    except BaseException:
        failed_log = root / f"salt-{version}.failed.log"
        try:
            failed_log.write_text(blog.text())
        except OSError:
            pass
        raise
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _make_venv(venv: Path, blog: _BuildLog) -> None:
    r = blog.run([_python(), "-m", "venv", venv], timeout=300)
    if r.returncode != 0:
        raise RuntimeError(f"cannot create a venv at {venv}:\n{_tail(r.stdout)}")


def _relaxed_install(
    version: str, py: Path, work: Path, blog: _BuildLog, bad: set[str]
) -> dict[str, str]:
    """Install the sdist's requirement list with the floors of ``bad`` relaxed, then salt."""
    sdist_dir = work / "sdist"
    r = blog.run(
        [
            py,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--no-binary",
            ":all:",
            "-d",
            sdist_dir,
            f"salt=={version}",
        ]
    )
    if r.returncode != 0:
        raise RuntimeError(
            f"salt {version}: `pip download` of the sdist failed:\n{_tail(r.stdout)}"
        )
    reqs = _requires_dist(sdist_dir, version)
    relaxed: dict[str, str] = {}
    to_relax = {_norm(n) for n in bad}
    last = ""
    for _round in range(_MAX_RELAX_ROUNDS):
        lines = []
        for req in reqs:
            new = _relax_floor(req) if _norm(_req_name(req)) in to_relax else req
            if new != req:
                relaxed[req] = new
            lines.append(new)
        req_file = work / "requirements.txt"
        req_file.write_text("\n".join(lines) + "\n")
        if relaxed:
            log.warning(
                "salt %s: relaxed %s",
                version,
                "; ".join(f"{a!r} -> {b!r}" for a, b in relaxed.items()),
            )
        r = blog.run([py, "-m", "pip", "install", "-r", req_file])
        if r.returncode == 0:
            break
        last = r.stdout
        more = {_norm(n) for n in _unsatisfiable(r.stdout)} - to_relax
        more &= {_norm(_req_name(q)) for q in reqs}
        if not more:
            raise RuntimeError(
                f"salt {version}: installing the sdist's requirement list (relaxed: "
                f"{relaxed or 'nothing'}) failed:\n{_tail(last)}"
            )
        log.warning("salt %s: also unsatisfiable: %s", version, ", ".join(sorted(more)))
        to_relax |= more
    else:
        raise RuntimeError(f"salt {version}: gave up relaxing requirements:\n{_tail(last)}")
    r = blog.run([py, "-m", "pip", "install", "--no-deps", f"salt=={version}"])
    if r.returncode != 0:
        raise RuntimeError(
            f"salt {version}: `pip install --no-deps salt=={version}` failed:\n{_tail(r.stdout)}"
        )
    return relaxed


def _check_scripts(venv: Path, version: str, blog: _BuildLog) -> None:
    missing = [s for s in SALT_SCRIPTS if not (venv / "bin" / s).exists()]
    if missing:
        raise RuntimeError(f"salt {version}: venv lacks {missing}:\n{_tail(blog.text())}")
    chk = blog.run(
        [
            venv / "bin" / "python",
            "-c",
            "import salt.version, sys; sys.stdout.write(salt.version.__version__)",
        ],
        timeout=300,
    )
    if chk.returncode != 0 or chk.stdout.strip() != version:
        raise RuntimeError(
            f"salt {version}: installed salt reports {chk.stdout.strip()!r}:\n{_tail(chk.stdout)}"
        )


def _relocate(venv: Path, final: Path) -> None:
    """Rewrite absolute paths of the build dir in ``bin/`` (script shebangs, activate)."""
    old, new = str(venv).encode(), str(final).encode()
    for p in (venv / "bin").iterdir():
        if p.is_symlink() or not p.is_file():
            continue
        data = p.read_bytes()
        if old in data:
            mode = p.stat().st_mode
            tmp = p.with_name(p.name + ".relocating")
            tmp.write_bytes(data.replace(old, new))
            os.chmod(tmp, mode)
            os.replace(tmp, p)


def _requires_dist(sdist_dir: Path, version: str) -> list[str]:
    files = list(sdist_dir.iterdir())
    if not files:
        raise RuntimeError(f"salt {version}: pip download left nothing in {sdist_dir}")
    path = files[0]
    text = None
    if path.name.endswith((".tar.gz", ".tgz", ".tar")):
        with tarfile.open(path) as tar:
            for m in tar.getmembers():
                parts = m.name.split("/")
                if len(parts) == 2 and parts[1] == "PKG-INFO":
                    f = tar.extractfile(m)
                    assert f is not None
                    text = f.read().decode()
                    break
    elif path.name.endswith(".zip"):
        with zipfile.ZipFile(path) as zf:
            for name in zf.namelist():
                parts = name.split("/")
                if len(parts) == 2 and parts[1] == "PKG-INFO":
                    text = zf.read(name).decode()
                    break
    if text is None:
        raise RuntimeError(f"salt {version}: no top-level PKG-INFO in {path.name}")
    reqs: list[str] = []
    for line in text.splitlines():
        if not line.strip():
            break  # end of the header block
        if line.startswith("Requires-Dist:"):
            req = line.split(":", 1)[1].strip()
            if re.search(r"\bextra\s*==", req):
                continue
            if req not in reqs:
                reqs.append(req)
    if not reqs:
        raise RuntimeError(f"salt {version}: PKG-INFO of {path.name} has no Requires-Dist")
    log.info("salt %s: %d requirement lines from %s", version, len(reqs), path.name)
    return reqs


_NAME_RE = re.compile(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)")


def _req_name(req: str) -> str:
    m = _NAME_RE.match(req)
    return m.group(1) if m else req


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _relax_floor(req: str) -> str:
    """``'certifi>=2026.10.23'`` -> ``'certifi'``; upper bounds, ``!=`` and markers stay."""
    body, sep, marker = req.partition(";")
    m = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(\[[^\]]*\])?\s*(.*)$", body)
    if not m:
        return req
    name, extras, spec = m.group(1), m.group(2) or "", m.group(3).strip()
    if spec.startswith("(") and spec.endswith(")"):
        spec = spec[1:-1]
    keep = [
        s.strip() for s in spec.split(",") if s.strip() and re.match(r"(<|<=|!=)(?!=)", s.strip())
    ]
    out = name + extras + ",".join(keep)
    return f"{out}; {marker.strip()}" if sep else out


def _unsatisfiable(pip_output: str) -> set[str]:
    """Names pip says it cannot find a matching version for."""
    names = set()
    for m in re.finditer(r"No matching distribution found for\s+(\S+)", pip_output):
        names.add(_req_name(m.group(1)))
    return names


def _python() -> str:
    return os.environ.get("HAMASTER_SALT_PYTHON") or sys.executable


def _clean_env() -> dict[str, str]:
    env = dict(os.environ)
    for k in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PYTHONSTARTUP", "PYTHONSAFEPATH"):
        env.pop(k, None)
    return env


def _pip_env() -> dict[str, str]:
    env = _clean_env()
    env.update(PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_NO_INPUT="1")
    return env


# --------------------------------------------------------------------------------------------
# stock daemons
# --------------------------------------------------------------------------------------------


def port_open(host: str, port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


class _SaltDaemon:
    """Shared parts of a stock Salt daemon run from a cached venv."""

    role = ""  # "master" or "minion"

    def __init__(
        self,
        bin_dir: str | os.PathLike[str],
        workdir: str | os.PathLike[str],
        config: Mapping[str, Any],
        extra: Mapping[str, Any] | None = None,
    ) -> None:
        self.bin_dir = Path(bin_dir)
        self.workdir = Path(workdir)
        self.conf_dir = self.workdir / "conf"
        self.root_dir = self.workdir / "root"
        r = self.root_dir
        self.log_file = r / "log" / f"{self.role}.log"
        self.output_file = r / "log" / f"{self.role}.out"  # daemon stdout + stderr
        self.pidfile = r / "run" / f"salt-{self.role}.pid"
        self.sock_dir = r / "sock"
        self.pki_dir = r / "pki" / self.role
        self.cachedir = r / "cache"
        base: dict[str, Any] = {
            "root_dir": str(r),
            "pki_dir": str(self.pki_dir),
            "cachedir": str(self.cachedir),
            "sock_dir": str(self.sock_dir),
            "pidfile": str(self.pidfile),
            "log_file": str(self.log_file),
            "log_level": "warning",
            "log_level_logfile": "debug",
            "user": pwd.getpwuid(os.getuid()).pw_name,
        }
        base.update(config)
        base.update(extra or {})
        self.config: dict[str, Any] = base
        self.proc: subprocess.Popen[bytes] | None = None
        self.started_at: float | None = None
        self.stop_seconds: float | None = None  # how long the last stop() took
        if len(str(self.sock_dir)) > 72:
            raise ValueError(
                f"workdir {self.workdir} is too long for Salt's unix sockets "
                f"(sock_dir {self.sock_dir}); use a shorter directory"
            )

    # -- config / lifecycle ------------------------------------------------------------

    def write_config(self) -> Path:
        """Write ``<conf_dir>/<role>`` and create the private directories."""
        self.conf_dir.mkdir(parents=True, exist_ok=True)
        for d in (
            self.log_file.parent,
            self.pidfile.parent,
            self.sock_dir,
            self.pki_dir,
            self.cachedir,
        ):
            d.mkdir(parents=True, exist_ok=True)
        path = self.conf_dir / self.role
        path.write_text(yaml.safe_dump(self.config, default_flow_style=False, sort_keys=True))
        return path

    def start(self) -> subprocess.Popen[bytes]:
        if self.running:
            raise RuntimeError(f"salt-{self.role} already running (pid {self.pid})")
        self.write_config()
        exe = self.bin_dir / f"salt-{self.role}"
        with open(self.output_file, "ab") as out:
            self.proc = subprocess.Popen(
                [str(exe), "-c", str(self.conf_dir)],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=str(self.root_dir),
                env=_clean_env(),
                start_new_session=True,
            )
        self.started_at = time.monotonic()
        log.info("started salt-%s pid %s (conf %s)", self.role, self.proc.pid, self.conf_dir)
        return self.proc

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = 15.0) -> float | None:
        """SIGTERM the daemon's process group, wait up to ``timeout`` s for the daemon to
        exit, then SIGKILL the group. Idempotent.

        The whole group gets SIGTERM, not only the daemon: a 3007.x minion otherwise waits
        ~25 s for a lingering job process (``ProcessPayload``) before it exits.
        Returns (and stores in ``stop_seconds``) how long the daemon took to exit.
        """
        proc = self.proc
        if proc is None:
            return None
        # the whole group, and whatever is left in it after the daemon exits (workers, job
        # processes): SIGTERM, then SIGKILL (tests.kit.stop_group)
        took = stop_group(proc, timeout)
        if took is not None:
            self.stop_seconds = took
            log.info(
                "stopped salt-%s pid %s in %.1f s (rc %s)",
                self.role,
                proc.pid,
                self.stop_seconds,
                proc.returncode,
            )
        return self.stop_seconds

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- logs ----------------------------------------------------------------------------

    def log_text(self) -> str:
        """The daemon's log file (debug level), or ``""`` before it exists."""
        try:
            return self.log_file.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def output_text(self) -> str:
        """What the daemon wrote to stdout/stderr (console log level ``warning``)."""
        try:
            return self.output_file.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def wait_for_log(self, pattern: str, timeout: float = 30.0) -> re.Match[str]:
        """Poll the log file until ``pattern`` (a regex) matches; return the match."""
        rx = re.compile(pattern)

        def check():
            self._raise_if_dead()
            return rx.search(self.log_text())

        return wait_until(check, timeout, 0.2, f"/{pattern}/ in {self.log_file}")

    def _raise_if_dead(self) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            raise RuntimeError(
                f"salt-{self.role} pid {self.proc.pid} exited with rc {self.proc.returncode}\n"
                f"--- output ---\n{self.output_text()[-3000:]}\n"
                f"--- log tail ---\n{self.log_text()[-3000:]}"
            )

    def describe(self) -> str:
        """Log/outputs tail, for assertion messages."""
        return (
            f"salt-{self.role} pid {self.pid} running={self.running}\n"
            f"--- {self.output_file} ---\n{self.output_text()[-2000:]}\n"
            f"--- {self.log_file} (tail) ---\n{self.log_text()[-4000:]}"
        )


class SaltMasterProc(_SaltDaemon):
    """A stock ``salt-master`` with a private config dir and root_dir.

    ``bin_dir`` is what :func:`ensure_salt` returns; ``workdir`` holds ``conf/`` and ``root/``.
    Ports default to free ones on ``interface``.
    """

    role = "master"

    def __init__(
        self,
        bin_dir: str | os.PathLike[str],
        workdir: str | os.PathLike[str],
        *,
        interface: str = "127.0.0.1",
        publish_port: int | None = None,
        ret_port: int | None = None,
        extra: Mapping[str, Any] | None = None,
    ) -> None:
        if publish_port is None or ret_port is None:
            p1, p2 = free_ports(2, interface)
            publish_port = publish_port or p1
            ret_port = ret_port or p2
        self.interface = interface
        self.publish_port = publish_port
        self.ret_port = ret_port
        root = Path(workdir) / "root"
        super().__init__(
            bin_dir,
            workdir,
            {
                "interface": interface,
                "publish_port": publish_port,
                "ret_port": ret_port,
                "file_roots": {"base": [str(root / "srv" / "salt")]},
                "pillar_roots": {"base": [str(root / "srv" / "pillar")]},
            },
            extra,
        )

    @property
    def address(self) -> str:
        """``"host:port"`` of the request (ret) port, as a minion's ``master`` entry."""
        return f"{self.interface}:{self.ret_port}"

    def write_config(self) -> Path:
        for key in ("file_roots", "pillar_roots"):
            for paths in (self.config.get(key) or {}).values():
                for p in paths:
                    Path(p).mkdir(parents=True, exist_ok=True)
        return super().write_config()

    def wait_ready(self, timeout: float = 60.0) -> float:
        """Wait until both ports accept connections and the event bus socket exists.

        Returns the seconds since :meth:`start`.
        """

        def ready():
            self._raise_if_dead()
            return (
                port_open(self.interface, self.ret_port)
                and port_open(self.interface, self.publish_port)
                and any(self.sock_dir.glob("master_event_pub*"))
            )

        wait_until(ready, timeout, 0.2, f"salt-master on {self.address}")
        return time.monotonic() - (self.started_at or time.monotonic())

    # -- CLI tools bound to this master's config ------------------------------------------

    def cli(self, tool: str, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        """Run ``<bin>/<tool> -c <conf_dir> *args`` (``salt``, ``salt-key``, ``salt-run``)."""
        argv = [str(self.bin_dir / tool), "-c", str(self.conf_dir), *map(str, args)]
        return subprocess.run(
            argv,
            capture_output=True,
            text=True,
            timeout=timeout,
            env=_clean_env(),
            cwd=str(self.root_dir),
        )

    def salt(self, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        return self.cli("salt", *args, timeout=timeout)

    def salt_key(self, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        return self.cli("salt-key", *args, timeout=timeout)

    def salt_run(self, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        return self.cli("salt-run", *args, timeout=timeout)

    def keys(self) -> dict[str, list[str]]:
        """``salt-key -L`` as a dict: ``minions``, ``minions_pre``, ``minions_rejected``, …"""
        r = self.salt_key("-L", "--out=json")
        if r.returncode != 0:
            raise RuntimeError(f"salt-key -L failed rc={r.returncode}: {r.stdout}{r.stderr}")
        return json.loads(r.stdout)

    def accept_key(self, minion_id: str, timeout: float = 60.0) -> None:
        """Wait until ``minion_id`` is pending, then ``salt-key -y -a`` it."""
        wait_until(
            lambda: minion_id in self.keys().get("minions_pre", []),
            timeout,
            0.5,
            f"{minion_id} pending on {self.address}",
        )
        r = self.salt_key("-y", "-a", minion_id)
        if minion_id not in self.keys().get("minions", []):
            raise RuntimeError(
                f"salt-key -a {minion_id} failed rc={r.returncode}: {r.stdout}{r.stderr}"
            )

    def run_job(
        self, tgt: str, fun: str, *args: str, tgt_type: str | None = None, job_timeout: int = 10
    ) -> tuple[dict[str, Any] | None, subprocess.CompletedProcess[str]]:
        """``salt [-L|-C|…] tgt fun args --out=json -t job_timeout``.

        Returns (merged JSON output or None, the CompletedProcess)."""
        # No `--static`: in 3008 it switches the CLI to batch mode (TEST-INFRA.md).
        opts = ["--out=json", f"-t{job_timeout}"]
        if tgt_type and tgt_type != "glob":
            opts.append(_TGT_FLAGS.get(tgt_type, f"--{tgt_type}"))
        r = self.salt(*opts, tgt, fun, *args, timeout=job_timeout + 60)
        return _parse_json_objects(r.stdout), r

    def ping(self, minion_id: str, timeout: float = 60.0, interval: float = 2.0) -> float:
        """Repeat ``salt <id> test.ping`` (at most one every ``interval`` s) until it answers
        True; returns the seconds it took. Raises TimeoutError otherwise."""
        t0 = time.monotonic()
        last: list[str] = []

        def once():
            self._raise_if_dead()
            t = time.monotonic()
            data, r = self.run_job(minion_id, "test.ping", job_timeout=5)
            last[:] = [
                f"rc={r.returncode} out={r.stdout.strip()!r} err={r.stderr.strip()[-500:]!r}"
            ]
            if data and data.get(minion_id) is True:
                return True
            # pace the attempts: never hammer stock minions (each job forks a process)
            time.sleep(max(0.0, interval - (time.monotonic() - t)))
            return False

        try:
            wait_until(once, timeout, 0.0, f"test.ping of {minion_id}")
        except TimeoutError as exc:
            raise TimeoutError(f"{exc}; last attempt: {last[0] if last else '-'}") from None
        return time.monotonic() - t0


class SaltMinionProc(_SaltDaemon):
    """A stock ``salt-minion`` with a private config dir and root_dir.

    ``master`` is ``"host:port"`` (port = the master's ret port) or a list of them for
    multi-master; ``master_port`` is written only when given. Leave ``publish_port`` out: the
    minion takes it from each master's auth reply.
    """

    role = "minion"

    def __init__(
        self,
        bin_dir: str | os.PathLike[str],
        workdir: str | os.PathLike[str],
        minion_id: str,
        master: str | Iterable[str],
        *,
        master_port: int | None = None,
        extra: Mapping[str, Any] | None = None,
    ) -> None:
        self.minion_id = minion_id
        masters = [master] if isinstance(master, str) else list(master)
        cfg: dict[str, Any] = {
            "id": minion_id,
            "master": masters[0] if isinstance(master, str) else masters,
            "acceptance_wait_time": 1,
            # No DNS on these machines: don't resolve every local address at start-up.
            "enable_fqdns_grains": False,
        }
        if master_port is not None:
            cfg["master_port"] = master_port
        super().__init__(bin_dir, workdir, cfg, extra)

    def wait_pending_auth(self, timeout: float = 60.0) -> re.Match[str]:
        """Wait until the log shows the minion has reached a master: pending
        ("The Salt Master has cached the public key for this node, …") or accepted
        ("Minion is ready to receive requests!")."""
        return self.wait_for_log(
            r"(has cached the public key for this node"
            r"|Minion is ready to receive requests)",
            timeout,
        )


_TGT_FLAGS = {
    "list": "-L",
    "pcre": "-E",
    "grain": "-G",
    "compound": "-C",
    "pillar": "-I",
    "ipcidr": "-S",
    "nodegroup": "-N",
}


def _parse_json_objects(text: str) -> dict[str, Any] | None:
    """``salt --out=json`` prints one JSON object per minion (not a single document)."""
    text = text.strip()
    if not text:
        return None
    dec = json.JSONDecoder()
    merged: dict[str, Any] = {}
    i = 0
    try:
        while i < len(text):
            while i < len(text) and text[i].isspace():
                i += 1
            if i >= len(text):
                break
            obj, i = dec.raw_decode(text, i)
            if isinstance(obj, dict):
                merged.update(obj)
    except ValueError:
        return merged or None
    return merged


def _main(argv: Sequence[str] | None = None) -> int:
    """``python -m tests.integration.interop.saltenv [VERSION …]`` from the repository root:
    build (or verify) the cached venvs."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    versions = list(argv if argv is not None else sys.argv[1:]) or SALT_VERSIONS
    for v in versions:
        t0 = time.monotonic()
        bindir = ensure_salt(v)
        print(f"salt {v}: {bindir} ({time.monotonic() - t0:.1f} s)", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(_main())
