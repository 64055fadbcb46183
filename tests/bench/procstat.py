"""CPU and memory of processes from /proc (Linux), for per-operation server cost.

The machine has few cores and the load generator shares them with the server, so ops/s
alone can say more about the client than about the server. CPU seconds a server process
spent per acknowledged operation compare servers even then.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
NCPU = os.cpu_count() or 1


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of ``pid`` (all threads); None once it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            text = f.read()
        fields = text[text.rindex(")") + 2 :].split()
        return (int(fields[11]) + int(fields[12])) / CLK_TCK
    except (OSError, ValueError, IndexError):
        return None


def rss_bytes(pid: int) -> int | None:
    """Resident set size of ``pid`` right now."""
    try:
        with open(f"/proc/{pid}/statm") as f:
            return int(f.read().split()[1]) * PAGE_SIZE
    except (OSError, ValueError, IndexError):
        return None


def machine_jiffies() -> tuple[int, int]:
    """(total, idle) jiffies of the whole machine."""
    with open("/proc/stat") as f:
        values = [int(x) for x in f.readline().split()[1:]]
    idle = values[3] + (values[4] if len(values) > 4 else 0)
    return sum(values), idle


def pids_named(comm: str, containing: str = "") -> list[int]:
    """Every process whose command name is ``comm`` and whose command line contains
    ``containing`` (e.g. the postgres backends serving one database)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/comm") as f:
                if f.read().strip() != comm:
                    continue
            if containing:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    if containing.encode() not in f.read():
                        continue
        except OSError:
            continue
        found.append(int(entry))
    return found


@dataclass
class CpuSnapshot:
    at: float
    servers: dict[int, float | None]
    stores: dict[int, float | None]
    clients: dict[int, float | None]
    coordinator: float | None
    machine: tuple[int, int]

    @classmethod
    def take(
        cls, servers: Iterable[int], clients: Iterable[int], store: tuple[str, str] | None
    ) -> CpuSnapshot:
        """``store``: (command name, command-line part) of separate database processes."""
        stores = {pid: cpu_seconds(pid) for pid in pids_named(*store)} if store else {}
        return cls(
            at=time.monotonic(),
            servers={pid: cpu_seconds(pid) for pid in servers},
            stores=stores,
            clients={pid: cpu_seconds(pid) for pid in clients},
            coordinator=cpu_seconds(os.getpid()),
            machine=machine_jiffies(),
        )


def _spent(before: dict[int, float | None], after: dict[int, float | None]) -> float | None:
    total = 0.0
    seen = False
    for pid, end in after.items():
        if end is None:
            continue
        start = before.get(pid)
        # A process that appeared in the window (a new postgres backend) started at zero.
        total += end - (start if start is not None else 0.0)
        seen = True
    return total if seen else None


def cpu_report(a: CpuSnapshot, b: CpuSnapshot) -> dict[str, float | int]:
    """Cores in use on average between two snapshots, by role."""
    window = b.at - a.at
    out: dict[str, float | int] = {"ncpu": NCPU, "window_s": round(window, 3)}
    if window <= 0:
        return out
    for name, before, after in (
        ("server", a.servers, b.servers),
        ("store", a.stores, b.stores),
        ("client", a.clients, b.clients),
    ):
        spent = _spent(before, after)
        if spent is not None:
            out[f"{name}_cpu_s"] = round(spent, 3)
            out[f"{name}_cores"] = round(spent / window, 3)
    if a.coordinator is not None and b.coordinator is not None:
        out["coordinator_cores"] = round((b.coordinator - a.coordinator) / window, 3)
    total = b.machine[0] - a.machine[0]
    if total > 0:
        idle = b.machine[1] - a.machine[1]
        busy = NCPU * (1.0 - idle / total)
        out["machine_busy_cores"] = round(busy, 3)
        # Whatever else ran meanwhile (another test suite, ...): a noisy measurement.
        ours = sum(float(out.get(f"{k}_cores", 0.0)) for k in ("server", "store", "client"))
        ours += float(out.get("coordinator_cores", 0.0))
        out["other_cores"] = round(max(0.0, busy - ours), 3)
    return out


def per_op_us(cpu: dict[str, float | int], ops: int) -> dict[str, float]:
    """CPU µs per acknowledged operation for the server (and its separate store)."""
    out: dict[str, float] = {}
    if ops <= 0:
        return out
    for name in ("server", "store", "client"):
        spent = cpu.get(f"{name}_cpu_s")
        if spent is not None:
            out[f"{name}_us_per_op"] = round(float(spent) * 1e6 / ops, 1)
    return out


@dataclass
class RssSampler:
    """Samples the summed RSS of some processes in a thread, until stopped."""

    pids: Sequence[int]
    interval: float = 0.5
    samples: list[int] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def sample(self) -> int | None:
        values = [rss_bytes(pid) for pid in self.pids]
        known = [v for v in values if v is not None]
        if not known:
            return None
        total = sum(known)
        self.samples.append(total)
        return total

    def start(self) -> RssSampler:
        def run() -> None:
            while not self._stop.is_set():
                self.sample()
                self._stop.wait(self.interval)

        self._thread = threading.Thread(target=run, name="bench-rss", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> dict[str, float]:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        last = self.sample()
        out: dict[str, float] = {}
        if self.samples:
            out["rss_max_mb"] = round(max(self.samples) / 2**20, 1)
        if last is not None:
            out["rss_end_mb"] = round(last / 2**20, 1)
        return out
