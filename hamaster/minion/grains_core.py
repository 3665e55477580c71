"""Core grains: cheap, Salt-named facts about the minion host (no subprocesses, no network).

:func:`collect_grains` reads ``/etc/os-release``, ``/proc`` and the ``socket``/``platform``
modules, then merges static grains on top: the ``grains`` file in the config directory (Salt's
``/etc/salt/grains``) and then the ``grains`` option of the minion config.
"""

from __future__ import annotations

import grp
import ipaddress
import logging
import os
import platform
import pwd
import socket
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

import hamaster

log = logging.getLogger(__name__)

# os-release ID -> (Salt "os" grain, Salt "os_family" grain)
_OS_NAMES: Mapping[str, tuple[str, str]] = {
    "ubuntu": ("Ubuntu", "Debian"),
    "debian": ("Debian", "Debian"),
    "linuxmint": ("Mint", "Debian"),
    "raspbian": ("Raspbian", "Debian"),
    "pop": ("Pop", "Debian"),
    "rhel": ("RedHat", "RedHat"),
    "centos": ("CentOS", "RedHat"),
    "fedora": ("Fedora", "RedHat"),
    "rocky": ("Rocky", "RedHat"),
    "almalinux": ("AlmaLinux", "RedHat"),
    "ol": ("OEL", "RedHat"),
    "amzn": ("Amazon", "RedHat"),
    "sles": ("SUSE", "Suse"),
    "opensuse-leap": ("Leap", "Suse"),
    "opensuse-tumbleweed": ("openSUSE Tumbleweed", "Suse"),
    "arch": ("Arch", "Arch"),
    "manjaro": ("Manjaro", "Arch"),
    "alpine": ("Alpine", "Alpine"),
    "gentoo": ("Gentoo", "Gentoo"),
    "void": ("Void", "Void"),
}
_FAMILY_BY_LIKE: Mapping[str, str] = {
    "debian": "Debian", "ubuntu": "Debian", "rhel": "RedHat", "fedora": "RedHat",
    "centos": "RedHat", "suse": "Suse", "arch": "Arch",
}


def _read_text(path: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""


def parse_os_release(text: str) -> dict[str, str]:
    """Parse ``/etc/os-release`` (KEY=value, optionally quoted) into a dict."""
    out: dict[str, str] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        key, _, value = line.partition("=")
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
            value = value[1:-1]
        out[key.strip()] = value
    return out


def os_grains(release: Mapping[str, str]) -> dict[str, Any]:
    """Derive ``os``, ``os_family``, ``osfullname``, ``osrelease`` … from os-release fields."""
    os_id = release.get("ID", "").lower()
    fullname = release.get("NAME", "") or platform.system()
    fullname = fullname.removesuffix(" GNU/Linux")  # Salt reports "Debian", not "Debian GNU/Linux"
    name, family = _OS_NAMES.get(os_id, ("", ""))
    if not name:
        name = fullname.split()[0] if fullname else platform.system()
    if not family:
        for like in release.get("ID_LIKE", "").lower().split():
            if like in _FAMILY_BY_LIKE:
                family = _FAMILY_BY_LIKE[like]
                break
        else:
            family = name
    osrelease = release.get("VERSION_ID", "")
    major_text = osrelease.split(".")[0]
    grains: dict[str, Any] = {
        "os": name,
        "os_family": family,
        "osfullname": fullname,
        "osrelease": osrelease,
        "oscodename": release.get("VERSION_CODENAME", ""),
    }
    if major_text.isdigit():
        grains["osmajorrelease"] = int(major_text)
    # Salt: Ubuntu's finger carries the full release, others the major release.
    finger_release = osrelease if name == "Ubuntu" else (major_text or osrelease)
    grains["osfinger"] = f"{fullname}-{finger_release}" if finger_release else fullname
    return grains


def _mem_total_mib() -> int:
    for line in _read_text("/proc/meminfo").splitlines():
        if line.startswith("MemTotal:"):
            parts = line.split()
            if len(parts) >= 2 and parts[1].isdigit():
                return int(parts[1]) // 1024
    return 0


def _cpu_model() -> str:
    for line in _read_text("/proc/cpuinfo").splitlines():
        if line.startswith(("model name", "Model", "cpu model")):
            return line.partition(":")[2].strip()
    return platform.processor() or ""


def _ipv4_addresses() -> list[str]:
    """Local IPv4 addresses from the kernel's FIB (``/proc/net/fib_trie``), plus 127.0.0.1."""
    addrs = {"127.0.0.1"}
    lines = _read_text("/proc/net/fib_trie").splitlines()
    for prev, line in zip(lines, lines[1:], strict=False):
        if line.strip() == "/32 host LOCAL":
            candidate = prev.strip().lstrip("|-+ ").strip()
            try:
                addrs.add(str(ipaddress.IPv4Address(candidate)))
            except ValueError:
                continue
    if len(addrs) == 1:
        # A UDP connect only picks a route; no packet is sent.
        try:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
                sock.connect(("192.0.2.1", 9))
                addrs.add(sock.getsockname()[0])
        except OSError:
            pass
    return sorted(addrs, key=lambda a: ipaddress.IPv4Address(a))


def _ipv6_addresses() -> list[str]:
    """Local IPv6 addresses from ``/proc/net/if_inet6``."""
    addrs = set()
    for line in _read_text("/proc/net/if_inet6").splitlines():
        hexaddr = line.split()[0] if line.split() else ""
        if len(hexaddr) == 32:
            try:
                addrs.add(str(ipaddress.IPv6Address(int(hexaddr, 16))))
            except ValueError:
                continue
    return sorted(addrs)


def _user_grains() -> dict[str, Any]:
    uid, gid = os.getuid(), os.getgid()
    try:
        username = pwd.getpwuid(uid).pw_name
    except KeyError:
        username = str(uid)
    try:
        groupname = grp.getgrgid(gid).gr_name
    except KeyError:
        groupname = str(gid)
    return {"uid": uid, "gid": gid, "username": username, "groupname": groupname}


def core_grains(minion_id: str | None) -> dict[str, Any]:
    """Return the core grains of this host, Salt-named, without static overrides."""
    hostname = socket.gethostname()
    fqdn = hostname
    host, _, domain = fqdn.partition(".")
    uname = platform.uname()
    grains: dict[str, Any] = {
        "id": minion_id or hostname,
        "host": host,
        "fqdn": fqdn,
        "nodename": uname.node,
        "localhost": hostname,
        "domain": domain,
        "kernel": uname.system,
        "kernelrelease": uname.release,
        "kernelversion": uname.version,
        "cpuarch": uname.machine,
        "cpu_model": _cpu_model(),
        "num_cpus": os.cpu_count() or 1,
        "mem_total": _mem_total_mib(),
        "ipv4": _ipv4_addresses(),
        "ipv6": _ipv6_addresses(),
        "pythonversion": list(sys.version_info),
        "pythonexecutable": sys.executable,
        "saltversion": hamaster.__version__,
        "hamaster_version": hamaster.__version__,
        "hamaster": True,
        "shell": os.environ.get("SHELL", "/bin/sh"),
        "pid": os.getpid(),
    }
    machine_id = _read_text("/etc/machine-id").strip()
    if machine_id:
        grains["machine_id"] = machine_id
    grains.update(os_grains(parse_os_release(_read_text("/etc/os-release")
                                             or _read_text("/usr/lib/os-release"))))
    grains["osarch"] = _osarch(uname.machine, grains.get("os_family"))
    grains.update(_user_grains())
    return grains


#: Debian's architecture names for ``uname -m`` (what ``dpkg --print-architecture`` says).
_DEB_ARCH = {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "armhf", "i686": "i386",
             "i386": "i386", "ppc64le": "ppc64el", "s390x": "s390x", "riscv64": "riscv64"}


def _osarch(machine: str, os_family: Any) -> str:
    """Salt's ``osarch``: the package architecture (Debian names on the Debian family)."""
    if os_family == "Debian":
        return _DEB_ARCH.get(machine, machine)
    return machine


def deep_merge(base: dict[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    """Return ``base`` updated with ``over``; dict values are merged recursively (new dict)."""
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def _grains_file(opts: Mapping[str, Any]) -> Path | None:
    confdir = opts.get("config_dir")
    if not confdir and opts.get("conf_file"):
        confdir = os.path.dirname(str(opts["conf_file"]))
    if not confdir:
        return None
    path = Path(str(confdir)) / "grains"
    return path if path.is_file() else None


def _load_grains_file(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        log.warning("ignoring grains file %s: %s", path, exc)
        return {}
    if data is None:
        return {}
    if not isinstance(data, dict):
        log.warning("ignoring grains file %s: top level must be a mapping, got %s",
                    path, type(data).__name__)
        return {}
    return data


def collect_grains(opts: Mapping[str, Any]) -> dict[str, Any]:
    """Return the minion's grains: core grains, then the ``grains`` file, then ``opts['grains']``.

    Static grains are deep-merged (nested dicts merge key by key, other values replace).
    """
    grains = core_grains(opts.get("id"))
    path = _grains_file(opts)
    if path is not None:
        grains = deep_merge(grains, _load_grains_file(path))
    static = opts.get("grains") or {}
    if isinstance(static, Mapping):
        grains = deep_merge(grains, static)
    else:
        log.warning("ignoring option 'grains': expected a mapping, got %s", type(static).__name__)
    return grains
