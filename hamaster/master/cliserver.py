"""Serves the local CLIs (``hamaster``, ``hamaster-run``) on a Unix socket in ``sock_dir``.

Who may connect is decided by file permissions: the directory is 0700 and the socket 0600.
Requests: ``{"cmd": "publish", ...}`` streams the job's returns as they arrive, waiting
``timeout``, or as Salt's CLI does with ``gather_job_timeout`` (:mod:`hamaster.master.waiting`),
then a final ``{"done": True, "missing": [...], "not_returned": {id: reason}}``; with ``batch``
it runs the job in batches;
``{"cmd": "runner", "fun", "arg"}`` answers once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import struct
from typing import TYPE_CHECKING, Any

from hamaster.localapi import MAX_LOCAL_FRAME, pack, socket_path, unpack_body

if TYPE_CHECKING:
    from hamaster.master.daemon import Master

log = logging.getLogger(__name__)


class CliServer:
    """The asyncio Unix-socket server for local clients."""

    def __init__(self, master: Master) -> None:
        self.master = master
        self.path = socket_path(master.opts["sock_dir"])
        self.server: asyncio.AbstractServer | None = None
        from hamaster.master.publisher_acl import PublisherAcl

        self.publisher_acl = PublisherAcl(master.opts)  # non-root callers (SO_PEERCRED)

    async def start(self) -> None:
        """Create the socket with safe permissions and start serving."""
        sock_dir = os.path.dirname(self.path)
        if len(os.fsencode(self.path)) > 107:
            raise OSError(
                f"the CLI socket path {self.path} is longer than a Unix socket allows (107 bytes): "
                "set a shorter sock_dir in the master config"
            )
        # publisher_acl: every local user may connect; the peer's uid decides what it may do
        shared = self.publisher_acl.enabled
        os.makedirs(sock_dir, mode=0o700, exist_ok=True)
        os.chmod(sock_dir, 0o755 if shared else 0o700)
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
        old = os.umask(0o177)
        try:
            self.server = await asyncio.start_unix_server(self._client, path=self.path)
        finally:
            os.umask(old)
        os.chmod(self.path, 0o666 if shared else 0o600)

    async def close(self) -> None:
        """Stop serving and remove the socket."""
        if self.server is not None:
            self.server.close()
            try:
                await asyncio.wait_for(self.server.wait_closed(), timeout=2)
            except TimeoutError:
                pass
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass

    async def _read(self, reader: asyncio.StreamReader) -> Any:
        hdr = await reader.readexactly(4)
        (size,) = struct.unpack(">I", hdr)
        if size > MAX_LOCAL_FRAME:
            raise ValueError("oversized frame")
        return unpack_body(await reader.readexactly(size))

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        from hamaster.master.publisher_acl import peer_caller

        caller = peer_caller(writer.get_extra_info("socket"))
        try:
            while True:
                try:
                    req = await self._read(reader)
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                if not isinstance(req, dict):
                    writer.write(pack({"error": "request must be a map"}))
                    await writer.drain()
                    continue
                cmd = req.get("cmd")
                if cmd == "publish":
                    if not await self._publish(req, reader, writer, caller):
                        return
                elif cmd == "runner":
                    await self._runner(req, writer, caller)
                elif cmd == "refresh_keys":
                    await self._refresh_keys(req, writer, caller)
                else:
                    writer.write(pack({"error": f"unknown local command {cmd!r}"}))
                    await writer.drain()
        except (ConnectionError, OSError) as exc:
            # A client going away (Ctrl-C, a timeout on its side) is normal: one debug line.
            log.debug("local client left: %r", exc)
        except Exception:
            log.exception("local client failed")
        finally:
            writer.close()

    async def _publish(self, req: dict, reader: asyncio.StreamReader,
                       writer: asyncio.StreamWriter, caller: Any = None) -> bool:
        """Publish a job and stream its returns (Salt's waiting rule, or a batch run).

        Returns False when the client went away while waiting (the job keeps running).
        """
        from hamaster.master.waiting import run_batch, wait_job

        m = self.master
        arg = req.get("arg") or []
        if not isinstance(arg, list) or not isinstance(req.get("fun"), str):
            writer.write(pack({"error": "publish needs fun (str) and arg (list)"}))
            await writer.drain()
            return True
        if caller is not None and not caller.unrestricted:  # publisher_acl
            refusal = self._refuse_publish(caller, req, arg)
            if refusal:
                log.warning("CLI: %s", refusal)
                writer.write(pack({"jid": None, "minions": [], "error": refusal}))
                await writer.drain()
                return True
            req = {**req, "user": caller.name}
        wait = bool(req.get("wait", True))
        timeout = float(req.get("timeout") or m.opts.get("timeout", 5))
        # Salt's probes only when asked (the hamaster CLI sends its gather_job_timeout); other
        # local clients (the drill pinger) get a plain wait of ``timeout``.
        gather = float(req.get("gather_job_timeout") or 0)
        gone = asyncio.Event()

        async def send(frame: dict) -> None:
            if gone.is_set():
                raise ConnectionResetError("the local client left")
            writer.write(pack(frame))
            await writer.drain()

        async def watch() -> None:
            # The client sends nothing while a job streams: EOF (or anything) means it left.
            try:
                await reader.read(1)
            except (ConnectionError, OSError):
                pass
            gone.set()

        watcher = asyncio.create_task(watch()) if wait else None
        try:
            if wait and req.get("batch"):
                await run_batch(m, req, send, gone)
                return not gone.is_set()
            pub = m.publish(
                req.get("tgt", "*"), req["fun"], arg, tgt_type=req.get("tgt_type", "glob"),
                ret=req.get("ret", ""), user=req.get("user", "root"), jid=req.get("jid") or None,
            )
            await send(pub)
            if not (pub.get("jid") and wait):
                return True

            async def stream(mid: str, ret: dict) -> None:
                await send({"ret": {mid: ret}})

            waiting = asyncio.create_task(
                wait_job(m, pub["jid"], set(pub["minions"]), timeout, gather, stream))
            assert watcher is not None
            await asyncio.wait({waiting, watcher}, return_when=asyncio.FIRST_COMPLETED)
            if not waiting.done():
                waiting.cancel()
                log.debug("local client left while waiting for job %s", pub["jid"])
                return False
            missing = waiting.result()
            await send({"done": True, "jid": pub["jid"], "missing": sorted(missing),
                        "not_returned": missing})
            return True
        except ConnectionError:
            log.debug("local client left during a publish")
            return False
        finally:
            if watcher is not None:
                watcher.cancel()
                # Awaited, so its pending read is gone before the connection reads again
                # (otherwise: "readexactly() called while another coroutine is waiting").
                with contextlib.suppress(asyncio.CancelledError):
                    await watcher

    def _refuse_publish(self, caller: Any, req: dict, arg: list) -> str | None:
        """publisher_acl's verdict on a publication, judged on the minions it targets."""
        m = self.master

        def matches(expr: str) -> set[str]:
            try:
                return set(m.resolve_targets(expr, "compound"))
            except ValueError:
                return set()

        try:
            targeted = m.resolve_targets(req.get("tgt", "*"), req.get("tgt_type", "glob"))
        except ValueError:
            targeted = []
        return self.publisher_acl.refuse_publish(caller, req["fun"], arg, targeted, matches)

    async def _refresh_keys(self, req: dict, writer: asyncio.StreamWriter,
                            caller: Any = None) -> None:
        """``hamaster-key`` on a single master: re-read these ids' key states from the store
        now and apply them (sessions dropped, publish key rotated) before answering, so the
        change is in force when the command returns (a cluster uses the key-change barrier)."""
        ids = req.get("ids")
        if caller is not None and not caller.unrestricted:
            reply: dict = {"error": "refresh_keys is for the master's own user"}
        elif not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
            reply = {"error": "refresh_keys needs ids (a list of strings)"}
        else:
            try:
                await asyncio.to_thread(self.master.keys.refresh, ids)
                reply = {"ok": True}
            except Exception as exc:  # the store unreadable: say so, the CLI reports it
                reply = {"error": f"cannot re-read the keys: {exc}"}
        writer.write(pack(reply))
        await writer.drain()

    async def _runner(self, req: dict, writer: asyncio.StreamWriter, caller: Any = None) -> None:
        from hamaster.master.runners import RunnerError, run_runner

        refusal = (self.publisher_acl.refuse_runner(caller, str(req.get("fun")))
                   if caller is not None else None)
        if refusal:
            log.warning("CLI: %s", refusal)
            writer.write(pack({"error": refusal}))
            await writer.drain()
            return
        try:
            result = await run_runner(self.master.runner_ctx, str(req.get("fun")),
                                     list(req.get("arg") or []), dict(req.get("kwarg") or {}))
            reply = {"return": result}
        except RunnerError as exc:
            reply = {"error": str(exc)}
        except Exception as exc:
            log.exception("runner %s failed", req.get("fun"))
            reply = {"error": f"runner failed: {exc}"}
        writer.write(pack(reply))
        await writer.drain()
