"""tether client: a typed asyncio client (and a blocking twin) for the tether control plane.

::

    async with TetherClient("127.0.0.1:50051") as client:
        async with client.hold("tasks/168", ttl=15, on_lost="cancel") as lease:
            ...  # lease.fencing_token fences every write

        async with client.run_saga("open-pr", "task-168", {"repo": "tether"}) as saga:
            branch = await saga.step("branch", make_branch, compensate=delete_branch)

        saga = await client.sagas.get("task-168")
        async for obj in client.objects.list(kind="Worktree", terminating_only=True):
            ...
        report = await client.sweeps.run(dry_run=True)

One client per service on one transport: ``client.leases``, ``client.sagas``,
``client.objects``, ``client.sweeps``; every method takes keyword arguments and returns the
resource (``Lease``, ``Saga``, ``Object``, ``SweepReport``) or a small result
(:mod:`tether_client.results`); lists and watches are async iterators. ``client.stubs``
reaches the generated gRPC stubs for anything else. Errors: the common ones here, every
one in :mod:`tether_client.errors`. Scripts without asyncio use ``TetherClientSync``: the
same surface, blocking. Over TLS, with a bearer token::

    credentials = tls_credentials(ca_file="ca.pem")  # + cert_file=, key_file= for mTLS
    async with TetherClient("tether.example:50051", credentials=credentials, token=t) as client:
        ...
"""

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    # The resources, as the generated messages (typed by their stubs).
    from tether_client._gen.tether.v1.common_pb2 import Fence, OwnerReference
    from tether_client._gen.tether.v1.lease_pb2 import Lease, LeaseEvent
    from tether_client._gen.tether.v1.owner_ref_pb2 import Object, ObjectEvent
    from tether_client._gen.tether.v1.saga_pb2 import Saga, SagaEvent
    from tether_client._gen.tether.v1.sweep_pb2 import SweepReport
    from tether_client.client import OnLost, TetherClient, default_holder
    from tether_client.clock import Clock, ManualClock, SystemClock
    from tether_client.connection import tls_credentials
    from tether_client.errors import (
        DeadlineExceeded,
        InvalidArgument,
        LeaseExpired,
        LeaseHeld,
        LeaseLost,
        LeaseNotHeld,
        LeaseRevoked,
        LockDelay,
        NothingClaimable,
        ObjectNotFound,
        PermissionDenied,
        RevisionCompacted,
        SagaAlreadyEnded,
        SagaClaimed,
        SagaNotFound,
        SagaTerminal,
        StaleFencingToken,
        TetherError,
        Unauthenticated,
        Unavailable,
        WaitTimeout,
    )
    from tether_client.finalizers import FinalizerWorker, RefuseFinalization
    from tether_client.keeper import HeldLease, KeeperConfig, KeeperStats
    from tether_client.results import (
        Acquired,
        Claim,
        CompensationRecorded,
        FinalizersForced,
        ObjectCreated,
        ObjectWritten,
        OwnerGraph,
        Renewal,
        SagaCreated,
        SagaHeartbeat,
        StepRecorded,
    )
    from tether_client.retry import RetryPolicy
    from tether_client.saga_run import CompensationWorker, SagaRun
    from tether_client.sync import TetherClientSync

# Imported on first use (PEP 562): the ``tether`` command sets gRPC's logging variables
# before anything imports grpc, which reads them once.
_EXPORTS: dict[str, str] = {
    "Acquired": "tether_client.results",
    "Claim": "tether_client.results",
    "Clock": "tether_client.clock",
    "CompensationRecorded": "tether_client.results",
    "CompensationWorker": "tether_client.saga_run",
    "DeadlineExceeded": "tether_client.errors",
    "FinalizerWorker": "tether_client.finalizers",
    "FinalizersForced": "tether_client.results",
    "HeldLease": "tether_client.keeper",
    "InvalidArgument": "tether_client.errors",
    "KeeperConfig": "tether_client.keeper",
    "KeeperStats": "tether_client.keeper",
    "LeaseExpired": "tether_client.errors",
    "LeaseHeld": "tether_client.errors",
    "LeaseLost": "tether_client.errors",
    "LeaseNotHeld": "tether_client.errors",
    "LeaseRevoked": "tether_client.errors",
    "LockDelay": "tether_client.errors",
    "ManualClock": "tether_client.clock",
    "NothingClaimable": "tether_client.errors",
    "ObjectCreated": "tether_client.results",
    "ObjectNotFound": "tether_client.errors",
    "ObjectWritten": "tether_client.results",
    "OnLost": "tether_client.client",
    "OwnerGraph": "tether_client.results",
    "PermissionDenied": "tether_client.errors",
    "RefuseFinalization": "tether_client.finalizers",
    "Renewal": "tether_client.results",
    "RetryPolicy": "tether_client.retry",
    "RevisionCompacted": "tether_client.errors",
    "SagaAlreadyEnded": "tether_client.errors",
    "SagaClaimed": "tether_client.errors",
    "SagaCreated": "tether_client.results",
    "SagaHeartbeat": "tether_client.results",
    "SagaNotFound": "tether_client.errors",
    "SagaRun": "tether_client.saga_run",
    "SagaTerminal": "tether_client.errors",
    "StaleFencingToken": "tether_client.errors",
    "StepRecorded": "tether_client.results",
    "SystemClock": "tether_client.clock",
    "TetherClient": "tether_client.client",
    "TetherClientSync": "tether_client.sync",
    "TetherError": "tether_client.errors",
    "Unauthenticated": "tether_client.errors",
    "Unavailable": "tether_client.errors",
    "WaitTimeout": "tether_client.errors",
    "default_holder": "tether_client.client",
    "tls_credentials": "tether_client.connection",
}
# The resources, as the generated messages (typed by their stubs).
_RESOURCES: dict[str, tuple[str, str]] = {
    "Fence": ("tether_client._gen.tether.v1.common_pb2", "Fence"),
    "Lease": ("tether_client._gen.tether.v1.lease_pb2", "Lease"),
    "LeaseEvent": ("tether_client._gen.tether.v1.lease_pb2", "LeaseEvent"),
    "Object": ("tether_client._gen.tether.v1.owner_ref_pb2", "Object"),
    "ObjectEvent": ("tether_client._gen.tether.v1.owner_ref_pb2", "ObjectEvent"),
    "OwnerReference": ("tether_client._gen.tether.v1.common_pb2", "OwnerReference"),
    "Saga": ("tether_client._gen.tether.v1.saga_pb2", "Saga"),
    "SagaEvent": ("tether_client._gen.tether.v1.saga_pb2", "SagaEvent"),
    "SweepReport": ("tether_client._gen.tether.v1.sweep_pb2", "SweepReport"),
}


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
    elif name in _RESOURCES:
        module, attribute = _RESOURCES[name]
        value = getattr(importlib.import_module(module), attribute)
    else:
        raise AttributeError(f"module 'tether_client' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)


__version__ = "0.1.0"

__all__ = [
    "Acquired",
    "Claim",
    "Clock",
    "CompensationRecorded",
    "CompensationWorker",
    "DeadlineExceeded",
    "Fence",
    "FinalizerWorker",
    "FinalizersForced",
    "HeldLease",
    "InvalidArgument",
    "KeeperConfig",
    "KeeperStats",
    "Lease",
    "LeaseEvent",
    "LeaseExpired",
    "LeaseHeld",
    "LeaseLost",
    "LeaseNotHeld",
    "LeaseRevoked",
    "LockDelay",
    "ManualClock",
    "NothingClaimable",
    "Object",
    "ObjectCreated",
    "ObjectEvent",
    "ObjectNotFound",
    "ObjectWritten",
    "OnLost",
    "OwnerGraph",
    "OwnerReference",
    "PermissionDenied",
    "RefuseFinalization",
    "Renewal",
    "RetryPolicy",
    "RevisionCompacted",
    "Saga",
    "SagaAlreadyEnded",
    "SagaClaimed",
    "SagaCreated",
    "SagaEvent",
    "SagaHeartbeat",
    "SagaNotFound",
    "SagaRun",
    "SagaTerminal",
    "StaleFencingToken",
    "StepRecorded",
    "SweepReport",
    "SystemClock",
    "TetherClient",
    "TetherClientSync",
    "TetherError",
    "Unauthenticated",
    "Unavailable",
    "WaitTimeout",
    "__version__",
    "default_holder",
    "tls_credentials",
]
