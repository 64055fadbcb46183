"""Server configuration: one dataclass, filled from flags and environment by the CLI."""

from __future__ import annotations

from dataclasses import dataclass, field

from tether_server.auth import AuthConfig
from tether_server.defaults import DEFAULT_DB, DEFAULT_LISTEN
from tether_server.domain.sweep import SweepConfig
from tether_server.domain.validation import Limits
from tether_server.expiry import ExpiryConfig
from tether_server.services.lease import LeaseServiceConfig
from tether_server.services.limits import ServerLimits
from tether_server.services.objects import ObjectServiceConfig
from tether_server.services.saga import SagaServiceConfig

__all__ = ["DEFAULT_DB", "DEFAULT_LISTEN", "ServerConfig"]


@dataclass(frozen=True)
class ServerConfig:
    listen: str = DEFAULT_LISTEN
    db_url: str = DEFAULT_DB
    # "system", or "file:PATH" for tests that drive a server process's clock.
    clock: str = "system"
    # How long in-flight calls and streams may finish after SIGTERM.
    grace_s: float = 10.0
    # How often the store is pinged for the health service.
    store_check_interval_s: float = 5.0
    # How often a PostgreSQL replica checks (or tries to take) the leader lock: bounds how
    # long leader-only tasks pause when the leader dies.
    leader_check_interval_s: float = 1.0
    # Stable name of this replica; empty means "<hostname>:<port>".
    replica: str = ""
    # HOST:PORT serving Prometheus metrics at /metrics; empty (the default) serves none.
    metrics_listen: str = ""
    lease: LeaseServiceConfig = field(default_factory=LeaseServiceConfig)
    expiry: ExpiryConfig = field(default_factory=ExpiryConfig)
    saga: SagaServiceConfig = field(default_factory=SagaServiceConfig)
    # How often overdue sagas are looked for (a created deadline also wakes the task).
    saga_deadline_interval_s: float = 1.0
    objects: ObjectServiceConfig = field(default_factory=ObjectServiceConfig)
    # The garbage collector looks at its queue this often when nothing woke it (work queued
    # through another replica, an owner parked waiting for terminating dependents).
    gc_interval_s: float = 1.0
    # Dependents per collector transaction.
    gc_batch_size: int = 1000
    # Sweeps: the periodic one's schedule, retention per kind, batch sizes.
    sweep: SweepConfig = field(default_factory=SweepConfig)
    # TLS, mutual TLS, bearer tokens; none of them: anonymous callers on loopback only.
    auth: AuthConfig = field(default_factory=AuthConfig)
    # Caps on concurrent calls, streams per connection, live leases and watches per principal.
    resource_limits: ServerLimits = field(default_factory=ServerLimits)
    # Largest request message accepted (RESOURCE_EXHAUSTED / MESSAGE_TOO_LARGE above).
    max_message_bytes: int = 4 * 1024 * 1024

    @property
    def limits(self) -> Limits:
        return self.lease.limits
