"""``tether lease run KEY --ttl 30s -- COMMAND``: run a command while holding a lease.

Like ``etcdctl lock`` and ``flock``, with the part they leave out: the lease is kept alive
while the command runs, and when it is lost (revoked, expired, unconfirmable) the command is
stopped, because another holder may already be running. The command gets its fencing token
in the environment to fence its own writes.

Exit status: the command's own (128+N when signal N killed it) while the lease was held
throughout; ``EXIT_LEASE_LOST`` (75, EX_TEMPFAIL) once it was lost, whatever the command did,
also when only the release at the end finds that the lease was revoked (or expired) while
the command ran.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from collections.abc import Awaitable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TypeVar

from tether_client.cli_env import child_environment
from tether_client.cli_format import duration, timestamp
from tether_client.client import TetherClient
from tether_client.convert import duration_seconds, to_datetime
from tether_client.errors import LeaseLost, TetherError
from tether_client.keeper import HeldLease
from tether_client.pb import lease_pb2

T = TypeVar("T")
EXIT_LEASE_LOST = 75  # EX_TEMPFAIL: the work may be retried by whoever holds the lease next
EXIT_CANNOT_EXECUTE = 126
EXIT_NOT_FOUND = 127
FORWARDED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def say(message: str) -> None:
    print(f"tether: {message}", file=sys.stderr, flush=True)


def _available_at(lease: lease_pb2.Lease) -> datetime | None:
    """When an ended lease's key is free again, if its lock delay still holds it."""
    delay = duration_seconds(lease.lock_delay)
    if delay <= 0 or lease.state == lease_pb2.LEASE_STATE_ACTIVE:
        return None
    ended = lease.ended_at if lease.HasField("ended_at") else lease.expires_at
    available = to_datetime(ended) + timedelta(seconds=delay)
    return available if available > datetime.now(UTC) else None


async def announce_wait(client: TetherClient, key: str, *, wait: float, holder: str) -> None:
    """Say once who holds ``key`` and until when (or until when its lock delay lasts),
    while an acquisition waits up to ``wait`` for it. Cancelled once it is acquired."""
    try:
        lease = await client.leases.get(key)
    except TetherError:
        return  # no lease for the key, or no answer: the acquisition says what matters
    waiting = f"waiting up to {duration(wait)}"
    if lease.state == lease_pb2.LEASE_STATE_ACTIVE and lease.holder != holder:
        until = timestamp(lease.expires_at)
        say(f"{key} is held by {lease.holder} until {until} (unless renewed); {waiting}")
        return
    available = _available_at(lease)
    if available is not None:
        until = available.strftime("%Y-%m-%dT%H:%M:%SZ")
        say(f"{key} is in its lock delay until {until}; {waiting}")


async def acquiring(
    client: TetherClient, acquisition: Awaitable[T], key: str, *, wait: float, holder: str
) -> T:
    """``acquisition``, saying who holds ``key`` if it has to wait (``wait`` > 0)."""
    task = asyncio.ensure_future(acquisition)
    if wait <= 0:
        return await task
    notice = asyncio.create_task(announce_wait(client, key, wait=wait, holder=holder))
    try:
        return await task
    finally:
        notice.cancel()
        await asyncio.gather(notice, return_exceptions=True)


def exit_status(returncode: int) -> int:
    """A shell's view of a child's status: 128+N when signal N ended it."""
    return 128 - returncode if returncode < 0 else returncode


def _terminal_sent_sigint() -> bool:
    """Whether a SIGINT most likely came from the terminal's Ctrl-C.

    The terminal signals its whole foreground process group, and the command shares ours,
    so it already has the signal; forwarding it would deliver it twice.
    """
    for fd in (0, 1, 2):
        with contextlib.suppress(OSError):
            if os.isatty(fd) and os.tcgetpgrp(fd) == os.getpgrp():
                return True
    return False


@dataclass
class RunSpec:
    key: str
    argv: Sequence[str]
    ttl: float
    wait: float = 0.0
    lock_delay: float = 0.0
    grace: float = 10.0
    labels: Mapping[str, str] = field(default_factory=dict)
    holder: str = ""


class Runner:
    """One ``lease run``: the lease, the child process, and the signals between them."""

    def __init__(self, spec: RunSpec) -> None:
        self.spec = spec
        self.proc: asyncio.subprocess.Process | None = None
        self.interrupted: int | None = None
        self._kill_timer: asyncio.TimerHandle | None = None
        self._main: asyncio.Task[object] | None = None

    async def run(self, client: TetherClient) -> int:
        loop = asyncio.get_running_loop()
        self._main = asyncio.current_task()
        for signum in FORWARDED_SIGNALS:
            loop.add_signal_handler(signum, self._on_signal, signum)
        spec = self.spec
        notice = None
        if spec.wait > 0:
            notice = asyncio.create_task(
                announce_wait(client, spec.key, wait=spec.wait, holder=spec.holder)
            )
        try:
            async with client.hold(
                spec.key,
                ttl=spec.ttl,
                holder=spec.holder or None,
                wait=spec.wait,
                lock_delay=spec.lock_delay,
                labels=spec.labels,
                on_lost=self._on_lost,
            ) as lease:
                if notice is not None:
                    notice.cancel()
                return await self._run_command(lease)
        except LeaseLost as exc:
            if self.proc is None:
                say(f"lease lost before the command started ({exc})")
            else:
                # Raised by the release: the server ended the lease while the command ran.
                status = exit_status(self.proc.returncode or 0)
                say(f"lease lost while the command ran (it exited {status}): {exc.message}")
            return EXIT_LEASE_LOST
        except asyncio.CancelledError:
            # A signal while acquiring: nothing runs yet, so there is nothing to forward it to.
            if self.interrupted is None:
                raise
            return 128 + self.interrupted
        finally:
            if notice is not None:
                notice.cancel()
                await asyncio.gather(notice, return_exceptions=True)
            for signum in FORWARDED_SIGNALS:
                loop.remove_signal_handler(signum)

    async def _run_command(self, lease: HeldLease) -> int:
        env = child_environment(
            {
                "TETHER_LEASE_KEY": lease.key,
                "TETHER_LEASE_ID": lease.lease_id,
                # Raises LeaseLost if the lease is lost already.
                "TETHER_FENCING_TOKEN": str(lease.fencing_token),
                "TETHER_NAMESPACE": lease.namespace,
            }
        )
        command = self.spec.argv[0]
        try:
            self.proc = await asyncio.create_subprocess_exec(*self.spec.argv, env=env)
        except FileNotFoundError:
            say(f"{command}: command not found")
            return EXIT_NOT_FOUND
        except OSError as exc:
            say(f"{command}: cannot run: {exc.strerror or exc}")
            return EXIT_CANNOT_EXECUTE
        if lease.lost:  # lost before the command existed to be stopped
            self._stop()
        try:
            returncode = await self.proc.wait()
        finally:
            if self._kill_timer is not None:
                self._kill_timer.cancel()
        # ``lease.lost`` also checks the safety deadline itself: a lease whose renewal could
        # not be confirmed was not held throughout, even if the keeper's timer is late.
        if lease.lost:
            return EXIT_LEASE_LOST
        return exit_status(returncode)

    def _on_lost(self, lease: HeldLease) -> None:
        # Called by the keeper (the lease is then never released): stop the command, another
        # holder may take the key at any moment.
        error = lease.lost_error
        why = f"lease lost: {error.message if error else lease.lease_id}"
        proc = self.proc
        if proc is not None and proc.returncode is not None:
            return  # the command is done; a release refused for it is reported on exit
        if proc is None:
            say(why)
            return
        grace = duration(self.spec.grace)
        say(f"{why}; stopping the command: SIGTERM to pid {proc.pid}, SIGKILL after {grace}")
        self._stop()

    def _stop(self) -> None:
        if self._kill_timer is not None:
            return
        self._send(signal.SIGTERM)
        loop = asyncio.get_running_loop()
        self._kill_timer = loop.call_later(self.spec.grace, self._kill)

    def _kill(self) -> None:
        proc = self.proc
        if proc is not None and proc.returncode is None:
            say(f"the command did not exit within {duration(self.spec.grace)}; sending SIGKILL")
            self._send(signal.SIGKILL)

    def _send(self, signum: int) -> None:
        proc = self.proc
        if proc is not None and proc.returncode is None:
            # It may have exited since the check; a reaped child is no error here.
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signum)

    def _on_signal(self, signum: int) -> None:
        proc = self.proc
        if proc is None:
            self.interrupted = signum
            if self._main is not None:
                self._main.cancel()
        elif proc.returncode is None:
            if signum == signal.SIGINT and _terminal_sent_sigint():
                return
            self._send(signum)
        # Once the command has exited, the release under way is bounded by its own timeout.
