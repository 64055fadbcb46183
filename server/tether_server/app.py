"""Assembles the server: store, recovery, gRPC services, health, reflection, loops."""

from __future__ import annotations

import logging
import secrets
import socket
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from tether_client.pb import lease_pb2, owner_ref_pb2, saga_pb2, sweep_pb2
from tether_server import __version__
from tether_server.auth import Authenticator
from tether_server.clock import Clock, clock_from_spec
from tether_server.config import ServerConfig
from tether_server.domain.errors import StoreUnavailable
from tether_server.domain.lease import LeaseState
from tether_server.domain.sweep import RECOVERY_PARTS, SweepTrigger
from tether_server.expiry import ExpiryLoop
from tether_server.metrics import Metrics, MetricsHttpServer, start_http
from tether_server.notify import ChangeHub, ChangeListener
from tether_server.reflection import enable_reflection
from tether_server.runtime import AlwaysLeader, Leadership, PgAdvisoryLeader, Runner, TaskSpec
from tether_server.services.handlers import CORE_LIMIT_FACTOR, CallGate, build_generic_handler
from tether_server.services.interceptor import RpcMetricsInterceptor
from tether_server.services.lease import LeaseService
from tether_server.services.limits import LimitsInterceptor
from tether_server.services.objects import ObjectService
from tether_server.services.saga import SagaService
from tether_server.services.streaming import WatchSlots
from tether_server.services.sweep import SweepService
from tether_server.store.batch import BatchResult
from tether_server.store.database import Database, describe_url
from tether_server.store.leases import LeaseStore
from tether_server.store.leases import rows as lease_rows
from tether_server.store.objects import ObjectStore
from tether_server.store.objects import rows as object_rows
from tether_server.store.pg_backend import CHANNEL as CHANGES_CHANNEL
from tether_server.store.pg_backend import PgBackend
from tether_server.store.replicas import ReplicaStore
from tether_server.store.sagas import SagaStore
from tether_server.store.sweeps import SweepStore
from tether_server.sweeper import Sweeper

log = logging.getLogger(__name__)

LEASE_SERVICE = lease_pb2.DESCRIPTOR.services_by_name["LeaseService"]
SAGA_SERVICE = saga_pb2.DESCRIPTOR.services_by_name["SagaService"]
OWNER_REF_SERVICE = owner_ref_pb2.DESCRIPTOR.services_by_name["OwnerRefService"]
SWEEP_SERVICE = sweep_pb2.DESCRIPTOR.services_by_name["SweepService"]
# Health reports the whole server ("") and each implemented service.
SERVING_SERVICES = (
    "",
    LEASE_SERVICE.full_name,
    SAGA_SERVICE.full_name,
    OWNER_REF_SERVICE.full_name,
    SWEEP_SERVICE.full_name,
)
# The advisory lock whose holder runs the leader-only tasks (PostgreSQL).
LEADER_LOCK_KEY = 0x7E7E_1EAD

_GRPC_OPTIONS = [
    # Never share a port silently with another process.
    ("grpc.so_reuseport", 0),
    # Let clients send keep-alive pings (they detect dead connections quickly) without
    # being told GOAWAY / too_many_pings.
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
    ("grpc.http2.max_ping_strikes", 0),
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
]


class TetherServer:
    def __init__(self, config: ServerConfig, clock: Clock | None = None) -> None:
        self.config = config
        self.clock = clock or clock_from_spec(config.clock)
        # Its own CollectorRegistry: servers in one process never share metrics.
        self.metrics = Metrics()
        # Bound port of the metrics endpoint (config.metrics_listen); 0 while none.
        self.metrics_port = 0
        self._metrics_http: MetricsHttpServer | None = None
        self.changes = ChangeHub()
        self._listener: ChangeListener | None = None
        self.db = Database(config.db_url, self.clock)
        self.db.after_commit(self._on_commit)
        self.leases = LeaseStore(self.db)
        self.sagas = SagaStore(self.db, max_steps=config.saga.saga_limits.max_steps)
        self.objects = ObjectStore(self.db, batch_size=config.gc_batch_size)
        self.replicas = ReplicaStore(self.db)
        # Unique per process start; names this process's heartbeat streams in the store.
        self.instance_id = secrets.token_hex(8)
        self.db.instance_id = self.instance_id
        self.db.on_batch = self.metrics.store_batch
        self.replica_name = config.replica
        self._lease_service: LeaseService | None = None
        self._saga_service: SagaService | None = None
        self._object_service: ObjectService | None = None
        self.leadership: Leadership
        if isinstance(self.db.backend_impl, PgBackend):
            # Leader-only tasks run on one replica at a time: the one holding this lock.
            self.leadership = PgAdvisoryLeader(
                self.db.backend_impl.dsn,
                self.clock,
                LEADER_LOCK_KEY,
                interval_s=config.leader_check_interval_s,
                on_change=self._on_leadership,
                application_name=f"tether-leader:{config.replica or 'replica'}",
            )
        else:
            # One server process per SQLite file.
            self.leadership = AlwaysLeader(on_change=self._on_leadership)
        self.runner = Runner(self.clock, self.leadership, on_run=self.metrics.task_run)
        # The store's clock: deadlines are judged by it (the database's on PostgreSQL).
        self.expiry = ExpiryLoop(
            self.leases,
            self.db.clock,
            config.expiry,
            on_lag=self.metrics.expiry_lag,
            on_clock_step=self.metrics.clock_step,
        )
        self.expiry.attach(self.runner)
        self.sweeps = SweepStore(self.db)
        self.sweeper = Sweeper(
            self.sweeps,
            self.objects,
            self.expiry,
            self.db.clock,
            config.sweep,
            self.metrics,
            replica=lambda: self.replica_name,
        )
        # When this process may run its first periodic sweep (set by the first pass).
        self._first_sweep_at_us: int | None = None
        self._add_tasks()
        config.auth.check(config.listen)
        self.authenticator = Authenticator(config.auth)
        self.gate = CallGate(self.authenticator, config.max_message_bytes)
        # health.aio is the public asyncio servicer; the stubs do not declare it.
        self.health = health.aio.HealthServicer()  # type: ignore[attr-defined]
        self.port = 0
        self._server: grpc.aio.Server | None = None
        self._serving = True
        self._draining = False

    async def start(self) -> int:
        """Migrate, bind and serve, recover, then admit calls. Returns the bound port.

        The port answers from the start, so a client that connects during recovery hears
        UNAVAILABLE / SERVER_STARTING (and health NOT_SERVING) instead of waiting."""
        await self.db.migrate()
        limits = self.config.resource_limits
        server = grpc.aio.server(
            options=[
                *_GRPC_OPTIONS,
                (
                    "grpc.max_receive_message_length",
                    CORE_LIMIT_FACTOR * self.config.max_message_bytes,
                ),
            ],
            # Metrics first: calls the limits refuse are counted as RESOURCE_EXHAUSTED.
            interceptors=[RpcMetricsInterceptor(self.metrics), LimitsInterceptor(limits)],
        )
        credentials = self.config.auth.server_credentials()
        if credentials is None:
            self.port = server.add_insecure_port(self.config.listen)
        else:
            self.port = server.add_secure_port(self.config.listen, credentials)
        if self.port == 0:
            raise OSError(f"cannot listen on {self.config.listen}")
        # Stable across restarts of one replica, so a restart reaps its predecessor.
        self.replica_name = self.config.replica or f"{socket.gethostname()}:{self.port}"
        # One count of open watches per principal, shared by every Watch* RPC.
        watches = WatchSlots(limits.max_watches_per_principal)
        lease_service = LeaseService(
            self.leases,
            self.clock,
            self.changes,
            self.metrics,
            self.config.lease,
            instance_id=self.instance_id,
            limits=limits,
            watches=watches,
        )
        self._lease_service = lease_service
        saga_service = SagaService(
            self.sagas,
            self.clock,
            self.changes,
            self.config.saga,
            watches=watches,
            instance_id=self.instance_id,
        )
        self._saga_service = saga_service
        object_service = ObjectService(
            self.objects,
            self.changes,
            self.config.objects,
            watches=watches,
            instance_id=self.instance_id,
        )
        self._object_service = object_service
        services: list[tuple[Any, object]] = [
            (LEASE_SERVICE, lease_service),
            (SAGA_SERVICE, saga_service),
            (OWNER_REF_SERVICE, object_service),
            (SWEEP_SERVICE, SweepService(self.sweeper, self.sweeps, self.config.limits)),
        ]
        server.add_generic_rpc_handlers(
            tuple(
                build_generic_handler(descriptor, impl, self.gate) for descriptor, impl in services
            )
        )
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        # Reflection v1 and v1alpha list themselves besides these.
        enable_reflection(
            [descriptor.full_name for descriptor, _ in services]
            + [health_pb2.DESCRIPTOR.services_by_name["Health"].full_name],
            server,
        )
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        await server.start()
        self._server = server
        await self._recover()
        if isinstance(self.db.backend_impl, PgBackend):
            # Other replicas' commits wake this one's waiters and watchers.
            self._listener = ChangeListener(
                self.changes, self.db.backend_impl.connect, CHANGES_CHANNEL, self.instance_id
            )
            await self._listener.start()
        self.gate.ready = True
        await self._set_health(health_pb2.HealthCheckResponse.SERVING)
        if self.config.metrics_listen:
            self._metrics_http = start_http(self.config.metrics_listen, self.metrics.registry)
            self.metrics_port = self._metrics_http.port
        self.leadership.start()
        self.runner.start()
        log.info(
            "tether started",
            extra={
                "version": __version__,
                "listen": self.config.listen,
                "port": self.port,
                "tls": self.config.auth.tls,
                # "anonymous" is only ever a loopback server unless told otherwise.
                "auth": self.config.auth.describe(),
                "metrics_port": self.metrics_port,
                "store": describe_url(self.config.db_url),
                "backend": self.db.backend,
                "replica": self.replica_name,
                "instance_id": self.instance_id,
            },
        )
        if not self.config.auth.requires_credentials:
            log.warning(
                "no credentials configured: every caller is the anonymous admin%s",
                " (on a non-loopback address, as --insecure-allow-anonymous asked)"
                if self.config.auth.insecure_allow_anonymous
                else "; serving on loopback only",
            )
        return self.port

    def reload_credentials(self) -> bool:
        """Re-read the tokens file (SIGHUP); open calls and streams go on."""
        return self.authenticator.reload()

    async def stop(self, grace_s: float | None = None) -> None:
        """Drain: report NOT_SERVING, stop accepting, let calls finish within the grace."""
        if self._draining:
            return
        self._draining = True
        grace = self.config.grace_s if grace_s is None else grace_s
        log.info("tether draining", extra={"grace_s": grace})
        await self.health.enter_graceful_shutdown()
        await self.runner.stop()
        await self.leadership.stop()
        if self._listener is not None:
            await self._listener.stop()
        if self._lease_service is not None:
            self._lease_service.drain()
        if self._saga_service is not None:
            self._saga_service.drain()
        if self._object_service is not None:
            self._object_service.drain()
        if self._server is not None:
            await self._server.stop(grace)
        if self._lease_service is not None:
            await self._lease_service.wait_streams_closed(timeout_s=5.0)
        # Every stream of this process is closed now; say so before the store goes away.
        try:
            await self.replicas.replica_deregister(self.instance_id)
        except StoreUnavailable:
            log.warning("could not deregister; other replicas will reap this one")
        await self.db.dispose()
        if self._metrics_http is not None:
            await self._metrics_http.close()
            self._metrics_http = None
        log.info("tether stopped")

    async def wait_for_termination(self) -> None:
        if self._server is not None:
            await self._server.wait_for_termination()

    async def _recover(self) -> None:
        """Before serving: forget the streams of processes that are gone, then the recovery
        sweep: expire what passed its deadline while no server ran, apply stale sagas'
        policies, finish the deletions a crash interrupted (the collector's queue is
        durable), and report it (one log line, one stored report)."""
        if self.db.is_sqlite:
            # SQLite has exactly one server process: no stream of any other is open.
            await self.leases.lease_detach_all_streams()
        reaped = await self.replicas.replica_register(
            self.instance_id, self.replica_name, self._stale_after_us
        )
        if reaped.dead_instances:
            log.info(
                "reaped replicas",
                extra={
                    "instances": reaped.dead_instances,
                    "streams_detached": reaped.streams_detached,
                },
            )
        await self.sweeper.run(SweepTrigger.STARTUP, parts=RECOVERY_PARTS)

    def _on_commit(self, result: BatchResult) -> None:
        if result.events:
            self.changes.publish({(e.area, e.namespace, e.key) for e in result.events})
        if result.deadlines:
            self.expiry.deadline_created(min(result.deadlines))
        if any(_may_queue_gc(e.area, e.type) for e in result.events):
            self.runner.wake("garbage-collector")

    async def _set_health(self, status: Any) -> None:
        for service in SERVING_SERVICES:
            await self.health.set(service, status)

    @property
    def _stale_after_us(self) -> int:
        # A replica that missed three heartbeats in a row is considered gone.
        return round(3 * self.config.store_check_interval_s * 1_000_000)

    async def _enforce_saga_deadlines(self) -> float | None:
        """Move overdue sagas to compensation; sleep until the next deadline (or the
        interval, whichever is sooner: a deadline created on another replica is not seen)."""
        done = await self.sagas.enforce_deadlines()
        if done.backlog:
            return 0
        upcoming = done.next_deadline_us
        if upcoming is None:
            return None
        wait_s = (upcoming - self.db.clock.now_us()) / 1_000_000
        return max(0.001, min(wait_s, self.config.saga_deadline_interval_s))

    def _add_tasks(self) -> None:
        interval = self.config.store_check_interval_s
        self.runner.add(
            TaskSpec(
                "store-heartbeat",
                self._heartbeat,
                interval_s=interval,
                backoff_initial_s=interval,
                backoff_max_s=2 * interval,
            )
        )
        self.runner.add(
            TaskSpec(
                "replica-reaper",
                self._reap,
                interval_s=interval,
                leader_only=True,
                backoff_initial_s=interval,
                backoff_max_s=10 * interval,
            )
        )
        self.runner.add(TaskSpec("active-leases", self._count_active, interval_s=15.0))
        self.runner.add(TaskSpec("saga-counts", self._count_sagas, interval_s=15.0))
        self.runner.add(
            TaskSpec(
                "saga-deadlines",
                self._enforce_saga_deadlines,
                interval_s=self.config.saga_deadline_interval_s,
            )
        )
        self.runner.add(
            TaskSpec(
                "garbage-collector",
                self._collect_garbage,
                interval_s=self.config.gc_interval_s,
                leader_only=True,
                backoff_initial_s=0.5,
                backoff_max_s=30.0,
            )
        )
        self.runner.add(
            TaskSpec(
                "sweep",
                self._periodic_sweep,
                interval_s=self.config.sweep.interval_s,
                leader_only=True,
                backoff_initial_s=1.0,
                backoff_max_s=max(1.0, self.config.sweep.interval_s),
            )
        )
        if self.db.db_clock is not None:
            self.runner.add(TaskSpec("clock-sync", self._sync_clock, interval_s=10.0))

    async def _heartbeat(self) -> None:
        """Prove this replica alive, which also proves the store reachable (health)."""
        try:
            await self.replicas.replica_heartbeat(self.instance_id, self.replica_name)
        except Exception:
            await self._set_serving(False)
            raise
        await self._set_serving(True)

    async def _reap(self) -> None:
        reaped = await self.replicas.replica_reap(self.instance_id, self._stale_after_us)
        if reaped.dead_instances:
            log.info(
                "reaped replicas",
                extra={
                    "instances": reaped.dead_instances,
                    "streams_detached": reaped.streams_detached,
                },
            )

    async def _count_active(self) -> None:
        self.metrics.active_leases = await self.leases.lease_count_active()

    async def _count_sagas(self) -> None:
        counts = await self.sagas.counts()
        self.metrics.sagas_by_state = counts.by_state
        self.metrics.sagas_stale = counts.stale
        self.metrics.sagas_overdue = counts.overdue

    async def _collect_garbage(self) -> float | None:
        done = await self.objects.collect()
        m = self.metrics
        m.gc_deleted += done.deleted
        m.gc_orphaned += done.orphaned
        m.gc_failures += done.failures
        if done.backlog:
            return 0
        state = await self.objects.collector_state()
        m.gc_queue_depth = state.stats.depth
        m.gc_queue_failing = state.stats.failing
        oldest = state.stats.oldest_enqueued_us
        m.gc_oldest_item_age_s = (
            0.0 if oldest is None else max(0.0, (self.db.clock.now_us() - oldest) / 1e6)
        )
        return None

    async def _periodic_sweep(self) -> float:
        """Sweep once an interval has passed since the latest periodic sweep of any
        replica (so a new leader does not sweep again at once), and not before the start
        delay of this process. Sleeps at most a twentieth of the interval between looks:
        the runner counts a returned delay from the end of the pass, and a look that took
        long (or another replica's sweep) must not push the next one late."""
        now = self.db.clock.now_us()
        if self._first_sweep_at_us is None:
            self._first_sweep_at_us = now + round(self.config.sweep.start_delay_s * 1_000_000)
        if now < self._first_sweep_at_us:
            return (self._first_sweep_at_us - now) / 1_000_000
        last = await self.sweeps.last_started(SweepTrigger.PERIODIC)
        if self.sweeper.next_delay_s(last, self.db.clock.now_us()) <= 0:
            last = (await self.sweeper.run(SweepTrigger.PERIODIC)).started_at_us
        # 0 when the next one is due already (the clock moved on during this one): the
        # runner then looks again at once instead of waiting for the clock to move further.
        wait_s = self.sweeper.next_delay_s(last, self.db.clock.now_us())
        return min(wait_s, self.config.sweep.interval_s / 20)

    async def _sync_clock(self) -> None:
        await self.db.sync_clock()

    def _on_leadership(self, leader: bool) -> None:
        self.metrics.leader = leader
        log.info("leadership %s", "acquired" if leader else "lost")

    async def _set_serving(self, healthy: bool) -> None:
        if healthy == self._serving or self._draining:
            return
        self._serving = healthy
        log.warning("store %s", "reachable again" if healthy else "unreachable")
        await self._set_health(
            health_pb2.HealthCheckResponse.SERVING
            if healthy
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )


def _may_queue_gc(area: str, event_type: str) -> bool:
    """Commits that can queue work for the collector: an object written, a lease ended."""
    if area == object_rows.AREA:
        return True
    return area == lease_rows.AREA and event_type in _LEASE_ENDINGS


_LEASE_ENDINGS = frozenset(
    state.value for state in (LeaseState.RELEASED, LeaseState.EXPIRED, LeaseState.REVOKED)
)
