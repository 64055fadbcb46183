"""tether client: a typed asyncio client (and a sync facade) for the tether control plane.

async with TetherClient("127.0.0.1:50051") as client:
    async with client.hold("tasks/168", ttl=timedelta(seconds=15)) as lease:
        ...  # lease.fencing_token fences every write; lease.lost says when to stop

Sagas run step by step under a claim, compensated when they fail (:mod:`tether_client.saga`)::

    async with client.run_saga("open-pr", "task-168", {"repo": "tether"}) as saga:
        branch = await saga.step("branch", make_branch, compensate=delete_branch)

Objects with finalizers go once a ``FinalizerWorker`` lets them (:mod:`tether_client.objects`)::

    worker = client.finalizer_worker("example.com/worktree", "Worktree", remove_worktree)
    await worker.run()

Scripts without asyncio use ``TetherClientSync`` (same methods, blocking).

Over TLS, with a bearer token (refused over plaintext unless the server is on this host)::

    credentials = tls_credentials(ca_file="ca.pem")  # + cert_file=, key_file= for mTLS
    async with TetherClient("tether.example:50051", credentials=credentials, token=t) as client:
        ...
"""

from tether_client.client import OnLost, TetherClient, default_holder
from tether_client.clock import Clock, ManualClock, SystemClock
from tether_client.connection import tls_credentials
from tether_client.errors import LeaseLost, LeaseNotHeld, TetherError
from tether_client.keeper import HeldLease, KeeperConfig, KeeperStats
from tether_client.objects import FinalizerWorker, RefuseFinalization
from tether_client.retry import RetryPolicy
from tether_client.saga import CompensationWorker, SagaRun
from tether_client.sync import TetherClientSync

__version__ = "0.1.0"

__all__ = [
    "Clock",
    "CompensationWorker",
    "FinalizerWorker",
    "HeldLease",
    "KeeperConfig",
    "KeeperStats",
    "LeaseLost",
    "LeaseNotHeld",
    "ManualClock",
    "OnLost",
    "RefuseFinalization",
    "RetryPolicy",
    "SagaRun",
    "SystemClock",
    "TetherClient",
    "TetherClientSync",
    "TetherError",
    "__version__",
    "default_holder",
    "tls_credentials",
]
