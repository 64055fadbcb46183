"""Load scenarios, run inside the load-generator worker processes.

Each worker runs one scenario object through the same life cycle, driven by
:func:`tests.bench.runner.worker_main`::

    setup()    connect, create the leases it needs, start the load (the warm-up)
    -- barrier: the parent samples CPU; the measurement window opens --
    measure()  record for the window (or until every expiry is seen)
    -- barrier: the parent samples CPU again --
    stop()     stop the load
    result()   a picklable dict for the parent to merge

Every loop is bounded by time (window, per-RPC deadline, setup and drain bounds) and by
count (lease counts, ``max_ops``).
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import logging
import math
import os
import time
from array import array
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import grpc

from tests.bench.adapters import Granted, KeepAliveStream, LeaseAPI, LeaseId, make_api

now = time.perf_counter
Config = dict[str, Any]


def split(total: int, parts: int, index: int) -> int:
    """The share of ``total`` that part ``index`` of ``parts`` gets."""
    return total // parts + (1 if index < total % parts else 0)


def err_name(exc: BaseException | None) -> str:
    if exc is None:
        return "none"
    code = getattr(exc, "code", None)
    if callable(code):
        with contextlib.suppress(Exception):
            return str(code().name)
    return type(exc).__name__


async def bounded_map(
    fn: Callable[[int], Awaitable[Any]], count: int, concurrency: int, deadline: float
) -> tuple[list[Any], Counter[str]]:
    """``fn(i)`` for i in range(count), at most ``concurrency`` at once, until ``deadline``."""
    results: list[Any] = [None] * count
    errors: Counter[str] = Counter()
    indexes = iter(range(count))

    async def runner() -> None:
        for i in indexes:
            if now() > deadline:
                errors["SETUP_DEADLINE"] += 1
                continue
            try:
                results[i] = await fn(i)
            except Exception as exc:
                errors[err_name(exc)] += 1

    await asyncio.gather(*(runner() for _ in range(max(1, min(concurrency, count)))))
    return results, errors


class Scenario:
    def __init__(self, cfg: Config, wid: int) -> None:
        self.cfg = cfg
        self.wid = wid
        self.procs: int = cfg["procs"]
        self.recording = False
        self.stopping = False
        self.lat = array("d")
        self.ok = 0
        self.errors: Counter[str] = Counter()
        self.extra: dict[str, Any] = {}
        self.prefix = f"bench/{cfg['scenario']}/{os.getpid()}/{time.time_ns()}/"
        self.api: LeaseAPI | None = None

    def open_api(self) -> LeaseAPI:
        self.api = make_api(
            self.cfg["api"], self.cfg["targets"], self.cfg["channels"], self.cfg["rpc_timeout"]
        )
        return self.api

    async def setup(self) -> None:
        pass

    async def measure(self) -> float:
        started = now()
        self.recording = True
        await asyncio.sleep(self.cfg["duration"])
        self.recording = False
        return now() - started

    async def stop(self) -> None:
        pass

    async def close(self) -> None:
        if self.api is not None:
            await asyncio.wait_for(self.api.close(), 5)

    def result(self) -> dict[str, Any]:
        return {"ok": self.ok, "lat": self.lat.tobytes(), "errors": dict(self.errors), **self.extra}


async def _wait_tasks(tasks: Iterable[asyncio.Task[Any]], timeout: float) -> Counter[str]:
    errors: Counter[str] = Counter()
    tasks = list(tasks)
    if not tasks:
        return errors
    done, pending = await asyncio.wait(tasks, timeout=timeout)
    for task in pending:
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    for task in done:
        if not task.cancelled() and task.exception() is not None:
            errors[err_name(task.exception())] += 1
    return errors


# --- grants -----------------------------------------------------------------------------


class GrantScenario(Scenario):
    """Callers granting leases back to back (etcd LeaseGrant, tether Acquire on new keys)."""

    async def setup(self) -> None:
        api = self.open_api()
        await api.ready(self.cfg["setup_timeout"])
        callers = split(self.cfg["concurrency"], self.procs, self.wid)
        self.issued = 0
        self.tasks = [asyncio.create_task(self.caller(api)) for _ in range(callers)]
        await asyncio.sleep(self.cfg["warmup"])

    async def caller(self, api: LeaseAPI) -> None:
        ttl, max_ops = self.cfg["ttl"], self.cfg["max_ops"]
        while not self.stopping and self.issued < max_ops:
            self.issued += 1
            started = now()
            try:
                await api.grant(ttl, self.prefix)
            except Exception as exc:
                if self.recording:
                    self.errors[err_name(exc)] += 1
                await asyncio.sleep(0.01)
                continue
            if self.recording:
                self.ok += 1
                self.lat.append(now() - started)

    async def stop(self) -> None:
        self.stopping = True
        await _wait_tasks(self.tasks, self.cfg["rpc_timeout"] + 2)


# --- keep-alives ------------------------------------------------------------------------


class KeepAliveScenario(Scenario):
    """Leases dealt over bidi streams, renewed as fast as the window allows.

    ``batch`` = 1: one lease per message (etcd's only form), ``window`` messages in flight
    per stream. ``batch`` = 0: each message renews every lease of its stream at once (the
    client's batching; etcd gets the same ids as a burst of single messages), ``window``
    bursts in flight. Either way a lease never has two renewals in flight when
    ``window * batch`` <= leases per stream. Acknowledged renewals are counted per lease.
    """

    async def setup(self) -> None:
        cfg = self.cfg
        api = self.open_api()
        await api.ready(cfg["setup_timeout"])
        count = split(cfg["leases"], self.procs, self.wid)
        streams = max(1, min(split(cfg["streams"], self.procs, self.wid), count))
        started = now()
        granted, errors = await bounded_map(
            lambda _: api.grant(cfg["ttl"], self.prefix), count, 64, now() + cfg["setup_timeout"]
        )
        ids = [g.lease_id for g in granted if g is not None]
        if errors or len(ids) != count:
            raise RuntimeError(f"setup: granted {len(ids)}/{count}, errors {dict(errors)}")
        self.extra["setup_s"] = round(now() - started, 3)
        self.refused = 0
        self.sent = 0
        groups = [ids[i::streams] for i in range(streams)]
        self.tasks = [asyncio.create_task(self.stream(api, g)) for g in groups]
        await asyncio.sleep(cfg["warmup"])

    async def stream(self, api: LeaseAPI, ids: list[LeaseId]) -> None:
        cfg = self.cfg
        batch = cfg["batch"] or len(ids)
        window = asyncio.Semaphore(cfg["window"])
        call: KeepAliveStream = api.keepalive()
        # One entry per message sent: [renewals still unanswered, send time].
        inflight: deque[list[float]] = deque()

        async def receiver() -> None:
            while True:
                outcomes = await call.recv()
                if outcomes is None:
                    return
                arrived = now()
                for _, ok in outcomes:
                    if not inflight:
                        self.errors["UNEXPECTED_ACK"] += 1
                        break
                    head = inflight[0]
                    head[0] -= 1
                    if self.recording:
                        if ok:
                            self.ok += 1
                        else:
                            self.refused += 1
                    if head[0] <= 0:
                        inflight.popleft()
                        if self.recording:
                            self.lat.append(arrived - head[1])
                        window.release()

        async def sender() -> None:
            position = 0
            try:
                while not self.stopping and self.sent < cfg["max_ops"]:
                    await window.acquire()
                    if self.stopping:
                        break
                    chunk = [ids[(position + k) % len(ids)] for k in range(batch)]
                    position += batch
                    inflight.append([len(chunk), now()])
                    self.sent += len(chunk)
                    await call.send(chunk)
            finally:
                with contextlib.suppress(Exception):
                    await call.done_writing()

        reading = asyncio.create_task(receiver())
        sending = asyncio.create_task(sender())
        try:
            done, _ = await asyncio.wait({reading, sending}, return_when=asyncio.FIRST_COMPLETED)
            if reading in done and not self.stopping:
                self.errors[err_name(reading.exception()) + "(stream ended)"] += 1
            else:
                # The server answers what was sent, then ends the stream.
                await asyncio.wait_for(reading, cfg["drain_timeout"])
        except TimeoutError:
            self.errors["DRAIN_TIMEOUT"] += 1
        except Exception as exc:
            self.errors[err_name(exc)] += 1
        finally:
            reading.cancel()
            sending.cancel()
            call.cancel()

    async def stop(self) -> None:
        self.stopping = True
        self.errors.update(await _wait_tasks(self.tasks, self.cfg["drain_timeout"] + 2))

    def result(self) -> dict[str, Any]:
        out = super().result()
        out["refused"] = self.refused
        return out


# --- expiry -----------------------------------------------------------------------------


class ExpiryScenario(Scenario):
    """N leases whose deadlines fall within one second, never renewed; the delay from each
    deadline to the arrival of its expiry report.

    Leases get whole seconds of ttl (etcd knows no less), so a deadline's place within the
    second is the phase of its grant: the grants are paced evenly over ``K`` whole seconds
    (``K`` from the grant rate measured earlier in the same run, or a short probe, with
    room to spare) and each gets ``ttl = ceil(T - now)``, at least ``min_ttl``. The deadlines
    then spread evenly over ``[T, T + 1)`` rather than fall into one instant of the
    server's expiry loop.
    """

    async def setup(self) -> None:
        cfg = self.cfg
        api = self.open_api()
        await api.ready(cfg["setup_timeout"])
        count = split(cfg["leases"], self.procs, self.wid)
        self.watch = api.expiry_watch(self.prefix)
        await self.watch.start(cfg["setup_timeout"])
        self.arrivals: dict[LeaseId, float] = {}
        self.reader = asyncio.create_task(self.read_events())

        rate = cfg.get("grant_rate") or await self.probe_rate(api)
        calls = count * api.calls_per_watched_lease
        pace_s = max(1, math.ceil(calls / max(1.0, rate * cfg["setup_rate_factor"])))
        if pace_s > cfg["setup_timeout"]:
            raise RuntimeError(
                f"setup would take ~{pace_s} s at {rate:.0f} grants/s "
                f"(> setup timeout {cfg['setup_timeout']} s); use fewer leases"
            )
        paced_from = time.time()
        self.window_start = math.ceil(paced_from + pace_s + cfg["lead_s"])
        min_ttl = cfg["min_ttl"]

        async def one(i: int) -> Granted:
            wait = paced_from + pace_s * i / count - time.time()
            if wait > 0:
                await asyncio.sleep(wait)
            ttl = max(min_ttl, math.ceil(self.window_start - time.time()))
            granted = await api.grant(ttl, self.prefix)
            await self.watch.attach(granted)
            return granted

        started = now()
        results, errors = await bounded_map(one, count, 64, now() + cfg["setup_timeout"])
        got = [r for r in results if r is not None]
        if errors or len(got) != count:
            raise RuntimeError(f"setup: granted {len(got)}/{count}, errors {dict(errors)}")
        self.deadlines = {g.lease_id: g.deadline for g in got}
        self.extra["setup_s"] = round(now() - started, 3)
        self.extra["paced_over_s"] = pace_s
        self.extra["grant_rate_used"] = round(rate, 1)
        deadlines = sorted(self.deadlines.values())
        self.extra["window_start"] = self.window_start
        self.extra["deadline_first"] = deadlines[0]
        self.extra["deadline_last"] = deadlines[-1]
        self.extra["outside_window"] = sum(
            1 for d in deadlines if not self.window_start - 0.05 <= d < self.window_start + 1.05
        )

    async def probe_rate(self, api: LeaseAPI) -> float:
        """Grants per second for one second, on a prefix nobody watches."""
        probe_prefix = self.prefix + "probe/"
        done = 0
        stop_at = now() + 1.0

        async def caller() -> None:
            nonlocal done
            while now() < stop_at:
                await api.grant(3600, probe_prefix)
                done += 1

        started = now()
        await asyncio.gather(*(caller() for _ in range(32)))
        return done / (now() - started)

    async def read_events(self) -> None:
        async for lease_id, arrived in self.watch.events():
            self.arrivals.setdefault(lease_id, arrived)

    async def measure(self) -> float:
        started = now()
        self.recording = True
        give_up = self.window_start + 1 + self.cfg["expiry_timeout"]
        while time.time() < give_up and not self.reader.done():
            if all(lease_id in self.arrivals for lease_id in self.deadlines):
                break
            await asyncio.sleep(0.05)
        self.recording = False
        return now() - started

    async def stop(self) -> None:
        self.watch.cancel()
        self.reader.cancel()
        with contextlib.suppress(asyncio.CancelledError, grpc.aio.AioRpcError, Exception):
            await self.reader

    def result(self) -> dict[str, Any]:
        delays = array(
            "d",
            (self.arrivals[i] - d for i, d in self.deadlines.items() if i in self.arrivals),
        )
        self.extra["leases"] = len(self.deadlines)
        self.extra["missing"] = len(self.deadlines) - len(delays)
        return {
            "ok": len(delays),
            "lat": delays.tobytes(),
            "errors": dict(self.errors),
            **self.extra,
        }


# --- the scale run: a client keeper holding many leases ---------------------------------


class EtcdKeeper:
    """A client keeping many etcd leases alive the way etcd's own Go client (clientv3) does:
    one keep-alive stream per client, one lease per message; every ``etcd_tick`` (0.5 s)
    each lease whose renewal is due is sent, a lease being due ``renew_fraction`` (1/3) of
    its ttl after its last acknowledged send. A lease counts as lost by the same rule as
    ``TetherClient.hold()``: once ``send time + ttl - margin`` passes without a newer ack
    (or when etcd answers TTL 0)."""

    def __init__(self, api: LeaseAPI, cfg: Config) -> None:
        self.api = api
        self.renew_fraction: float = cfg["renew_fraction"]
        self.coalesce_fraction: float = cfg["etcd_coalesce_fraction"]
        self.tick: float = cfg["etcd_tick"]
        self.margin_fraction: float = cfg["margin_fraction"]
        # lease id -> [ttl, safe_until, next_renew, in_flight(0/1), lost(0/1)]
        self.leases: dict[LeaseId, list[float]] = {}
        self.renew_heap: list[tuple[float, LeaseId]] = []
        self.safe_heap: list[tuple[float, LeaseId]] = []
        self.inflight: deque[tuple[LeaseId, float]] = deque()
        self.acked = 0
        self.sent = 0
        self.lost = 0
        self.streams_opened = 0
        self.streams_broken = 0
        # Where acknowledgement latencies go (set by the scenario per phase), if anywhere.
        self.ack_sink: array[float] | None = None
        self.closed = False
        self.call: KeepAliveStream | None = None
        self.reader: asyncio.Task[None] | None = None
        self.task: asyncio.Task[None] | None = None

    def margin(self, ttl: float) -> float:
        return max(0.05, ttl * self.margin_fraction)

    def add(self, granted: Granted, sent_at: float) -> None:
        ttl = granted.ttl_s
        state = [ttl, sent_at + ttl - self.margin(ttl), sent_at + ttl * self.renew_fraction, 0, 0]
        self.leases[granted.lease_id] = state
        heapq.heappush(self.renew_heap, (state[2], granted.lease_id))
        heapq.heappush(self.safe_heap, (state[1], granted.lease_id))
        if self.task is None:
            self.task = asyncio.create_task(self.run())

    def safe_until(self, lease_id: LeaseId) -> float:
        return self.leases[lease_id][1]

    def _open(self) -> KeepAliveStream:
        self.call = self.api.keepalive()
        self.streams_opened += 1
        self.reader = asyncio.create_task(self._read(self.call))
        return self.call

    def _declare_lost(self, lease_id: LeaseId) -> None:
        state = self.leases[lease_id]
        if not state[4]:
            state[4] = 1
            self.lost += 1

    async def _read(self, call: KeepAliveStream) -> None:
        try:
            while True:
                outcomes = await call.recv()
                if outcomes is None:
                    break
                arrived = now()
                for lease_id, ok in outcomes:
                    if not self.inflight:
                        break
                    sent_lease, sent_at = self.inflight.popleft()
                    state = self.leases.get(sent_lease)
                    if state is None:
                        continue
                    state[3] = 0
                    if self.ack_sink is not None:
                        self.ack_sink.append(arrived - sent_at)
                    if not ok or sent_lease != lease_id:
                        self._declare_lost(sent_lease)
                        continue
                    if state[4]:
                        continue
                    self.acked += 1
                    ttl = state[0]
                    state[1] = sent_at + ttl - self.margin(ttl)
                    state[2] = sent_at + ttl * self.renew_fraction
                    heapq.heappush(self.renew_heap, (state[2], sent_lease))
        except Exception:
            pass
        if not self.closed:
            self._broken(call)

    def _broken(self, call: KeepAliveStream) -> None:
        if call is not self.call:
            return
        self.streams_broken += 1
        self.call = None
        call.cancel()
        at = now()
        while self.inflight:
            lease_id, _ = self.inflight.popleft()
            state = self.leases[lease_id]
            state[3] = 0
            state[2] = at
            heapq.heappush(self.renew_heap, (at, lease_id))

    async def run(self) -> None:
        tick = self.tick
        while not self.closed:
            t = now()
            # Losses: the earliest safety deadlines first; stale entries are pushed again.
            while self.safe_heap and self.safe_heap[0][0] <= t:
                _, lease_id = heapq.heappop(self.safe_heap)
                state = self.leases[lease_id]
                if state[4]:
                    continue
                if state[1] <= t:
                    self._declare_lost(lease_id)
                else:
                    heapq.heappush(self.safe_heap, (state[1], lease_id))
            heap = self.renew_heap
            if heap and heap[0][0] <= t:
                call = self.call or (self._open() if self.streams_broken < 100 else None)
                if call is not None:
                    due: list[LeaseId] = []
                    while heap:
                        at, lease_id = heap[0]
                        state = self.leases[lease_id]
                        if at - state[0] * self.coalesce_fraction > t:
                            break
                        heapq.heappop(heap)
                        if state[4] or state[3] or at != state[2]:
                            continue  # lost, in flight, or a stale entry
                        state[3] = 1
                        due.append(lease_id)
                    try:
                        for lease_id in due:
                            # Stamped one by one: a long burst is not counted as server time.
                            self.inflight.append((lease_id, now()))
                            self.sent += 1
                            await call.send((lease_id,))
                    except Exception:
                        self._broken(call)
            await asyncio.sleep(tick)

    async def close(self) -> None:
        self.closed = True
        for task in (self.task, self.reader):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        if self.call is not None:
            self.call.cancel()


class ScaleScenario(Scenario):
    """Many leases held by a client keeper in each worker process, for the whole window.

    tether (and the noop server): ``TetherClient.hold()``, the real client. etcd:
    :class:`EtcdKeeper` (etcd's own client's renewal loop, the keeper's loss rule). Leases
    are acquired while the first ones are already renewed. Reported: leases lost (setup
    and window), renewals acknowledged per second, renewal acknowledgement latency (send
    of a renewal request to its response; setup and window apart), when the first lease
    was lost, and the smallest ``safe_until - now`` seen.
    """

    async def setup(self) -> None:
        cfg = self.cfg
        count = split(cfg["leases"], self.procs, self.wid)
        self.count = count
        self.ack_setup: array[float] = array("d")
        self.ack_window: array[float] = array("d")
        self.ack_sink: array[float] | None = self.ack_setup
        self.held: list[Any] = []
        started = now()
        deadline = started + cfg["setup_timeout"]
        watcher = asyncio.create_task(self._watch_setup(started))
        if cfg["api"] == "etcd":
            api = self.open_api()
            await api.ready(cfg["setup_timeout"])
            self.keeper = EtcdKeeper(api, cfg)
            self.keeper.ack_sink = self.ack_setup

            async def grant(_: int) -> None:
                sent_at = now()
                granted = await api.grant(cfg["ttl"], self.prefix)
                self.keeper.add(granted, sent_at)

            _, errors = await bounded_map(grant, count, cfg["setup_concurrency"], deadline)
            self.held = list(self.keeper.leases)
        else:
            errors = await self._setup_tether(count, deadline)
        watcher.cancel()
        self.errors.update({f"setup:{k}": v for k, v in errors.items()})
        self.extra["setup_s"] = round(now() - started, 3)
        self.extra["held"] = len(self.held)
        self.extra["lost_in_setup"] = self._lost()
        self.acked_before = self._acked()
        self.lost_before = self._lost()

    async def _setup_tether(self, count: int, deadline: float) -> Counter[str]:
        from tether_client import TetherClient
        from tether_client.keeper import KeeperConfig

        cfg = self.cfg
        keeper_cfg = KeeperConfig(
            renew_fraction=cfg["renew_fraction"],
            safety_margin_fraction=cfg["margin_fraction"],
            coalesce_fraction=cfg["coalesce_fraction"],
        )
        # Losses are counted in the keeper's stats; one warning per lost lease (and one per
        # lease when the client closes) would flood the output.
        logging.getLogger("tether_client").setLevel(logging.ERROR)
        self.client = TetherClient(cfg["targets"], keeper=keeper_cfg)
        # The keeper is internal to the client: the bench times its acks from inside.
        self._time_acks(self.client._keeper)
        # The holds are entered here and never exited: leaving 10 000 hold() blocks would
        # release every lease one call at a time; the server is thrown away instead.
        self.stack = contextlib.AsyncExitStack()
        self.held = []
        errors: Counter[str] = Counter()
        keys = iter(range(count))

        async def holder() -> None:
            for i in keys:
                if now() > deadline:
                    errors["SETUP_DEADLINE"] += 1
                    continue
                try:
                    lease = await self.stack.enter_async_context(
                        self.client.hold(f"{self.prefix}{i}", ttl=cfg["ttl"], timeout=60)
                    )
                except Exception as exc:
                    errors[err_name(exc)] += 1
                    continue
                self.held.append(lease)

        await asyncio.gather(*(holder() for _ in range(cfg["setup_concurrency"])))
        return errors

    async def _watch_setup(self, started: float) -> None:
        """When the first lease was lost during the setup, and how many were held then."""
        while True:
            await asyncio.sleep(0.5)
            with contextlib.suppress(AttributeError):
                if self._lost():
                    self.extra["first_loss_s"] = round(now() - started, 1)
                    self.extra["worker_held_at_first_loss"] = (
                        len(self.keeper.leases) if self.cfg["api"] == "etcd" else len(self.held)
                    )
                    return

    def _time_acks(self, keeper: Any) -> None:
        """Time each renewal request from its send to its response, around the keeper's own
        handler (its request records carry the send time)."""
        original = keeper.on_response
        clock = keeper.clock

        def on_response(stream: Any, response: Any) -> None:
            sink = self.ack_sink
            if sink is not None:
                record = getattr(stream, "pending", {}).get(response.sequence)
                if record is not None and getattr(record, "leases", None):
                    sink.append(clock.monotonic() - record.sent_at)
            original(stream, response)

        keeper.on_response = on_response

    def _acked(self) -> int:
        if self.cfg["api"] == "etcd":
            return self.keeper.acked
        return int(self.client.keeper_stats.renewals_acked)

    def _lost(self) -> int:
        if self.cfg["api"] == "etcd":
            return self.keeper.lost
        return int(self.client.keeper_stats.leases_lost)

    def _min_slack(self) -> float:
        if self.cfg["api"] == "etcd":
            t = now()
            live = [s[1] for s in self.keeper.leases.values() if not s[4]]
            return min(live) - t if live else math.inf
        t = self.client._transport.clock.monotonic()
        live = [lease.safe_until for lease in self.held if not lease.lost]
        return min(live) - t if live else math.inf

    async def measure(self) -> float:
        started = now()
        end = started + self.cfg["duration"]
        self.recording = True
        self.ack_sink = self.ack_window
        if self.cfg["api"] == "etcd":
            self.keeper.ack_sink = self.ack_window
        min_slack = math.inf
        while now() < end:
            min_slack = min(min_slack, self._min_slack())
            await asyncio.sleep(min(1.0, max(0.0, end - now())))
        self.recording = False
        self.ack_sink = None
        elapsed = now() - started
        self.ok = self._acked() - self.acked_before
        self.extra["lost_in_window"] = self._lost() - self.lost_before
        self.extra["min_slack_s"] = round(min_slack, 3) if min_slack != math.inf else None
        if self.cfg["api"] == "etcd":
            self.keeper.ack_sink = None
            self.extra.update(
                streams_opened=self.keeper.streams_opened,
                streams_broken=self.keeper.streams_broken,
            )
        else:
            stats = self.client.keeper_stats
            self.extra.update(
                streams_opened=stats.streams_opened,
                streams_broken=stats.streams_broken,
                requests_sent=stats.requests_sent,
                unary_renewals=stats.unary_renewals,
            )
        return elapsed

    def result(self) -> dict[str, Any]:
        out = super().result()
        out["lat"] = self.ack_window.tobytes()
        out["setup_lat"] = self.ack_setup.tobytes()
        return out

    async def close(self) -> None:
        if self.cfg["api"] == "etcd":
            if hasattr(self, "keeper"):
                await self.keeper.close()
            await super().close()
        elif hasattr(self, "client"):
            # Closing the client reports the held leases lost (after the figures were taken).
            await asyncio.wait_for(self.client.close(), 30)


SCENARIOS: dict[str, type[Scenario]] = {
    "grant": GrantScenario,
    "keepalive": KeepAliveScenario,
    "expiry": ExpiryScenario,
    "scale": ScaleScenario,
}


def scenario_for(cfg: Config, wid: int) -> Scenario:
    if cfg["kind"] == "saga":
        from tests.bench.saga import SagaScenario  # it builds on this module

        return SagaScenario(cfg, wid)
    return SCENARIOS[cfg["kind"]](cfg, wid)
