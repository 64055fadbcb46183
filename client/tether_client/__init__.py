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
from tether_client.pb import common_pb2, lease_pb2, owner_ref_pb2, saga_pb2, sweep_pb2
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

# The resources, as the generated messages (typed by their stubs).
Lease = lease_pb2.Lease
LeaseEvent = lease_pb2.LeaseEvent
Saga = saga_pb2.Saga
SagaEvent = saga_pb2.SagaEvent
Object = owner_ref_pb2.Object
ObjectEvent = owner_ref_pb2.ObjectEvent
OwnerReference = common_pb2.OwnerReference
Fence = common_pb2.Fence
SweepReport = sweep_pb2.SweepReport

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
