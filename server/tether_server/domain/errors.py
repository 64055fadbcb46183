"""Domain errors. Each names its ErrorInfo reason and the facts a client needs.

The service layer maps them to gRPC status codes in one table (services/errors.py); the
domain and the store only raise them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import ClassVar


@dataclass(eq=False)
class TetherError(Exception):
    message: str
    metadata: Mapping[str, str] = field(default_factory=dict)

    reason = "UNSPECIFIED"
    # Seconds a client should wait before retrying (sent as google.rpc.RetryInfo); None
    # when a retry cannot help.
    retry_after_s: ClassVar[float | None] = None

    def __str__(self) -> str:
        return self.message


class InvalidField(TetherError):
    reason = "INVALID_FIELD"

    def __init__(self, field_name: str, message: str) -> None:
        super().__init__(f"{field_name}: {message}", {"field": field_name})
        self.field_name = field_name


class MalformedRequest(TetherError):
    reason = "MALFORMED_REQUEST"


class InvalidPageToken(TetherError):
    reason = "INVALID_PAGE_TOKEN"

    def __init__(self, message: str = "page token is malformed or belongs to another query"):
        super().__init__(message, {"field": "page_token"})


class LeaseHeld(TetherError):
    reason = "LEASE_HELD"


class LockDelay(TetherError):
    reason = "LOCK_DELAY"


class WaitTimeout(TetherError):
    reason = "WAIT_TIMEOUT"


class LeaseNotFound(TetherError):
    reason = "LEASE_NOT_FOUND"


class LeaseExpired(TetherError):
    reason = "LEASE_EXPIRED"


class LeaseReleased(TetherError):
    reason = "LEASE_RELEASED"


class LeaseRevoked(TetherError):
    reason = "LEASE_REVOKED"


class StaleFencingToken(TetherError):
    reason = "STALE_FENCING_TOKEN"


class NotLeaseHolder(TetherError):
    reason = "NOT_LEASE_HOLDER"


class AdminRequired(TetherError):
    reason = "ADMIN_REQUIRED"


class RevisionCompacted(TetherError):
    reason = "REVISION_COMPACTED"


class KeepAliveIdle(TetherError):
    reason = "KEEPALIVE_IDLE"


class StoreUnavailable(TetherError):
    reason = "STORE_UNAVAILABLE"
    retry_after_s = 0.5


class ServerDraining(TetherError):
    reason = "SERVER_DRAINING"


class ServerStarting(TetherError):
    reason = "SERVER_STARTING"
    retry_after_s = 1.0


class RequestIdConflict(TetherError):
    reason = "REQUEST_ID_CONFLICT"


class NotImplementedYet(TetherError):
    reason = "NOT_IMPLEMENTED"


class SagaNotFound(TetherError):
    reason = "SAGA_NOT_FOUND"


class SagaTerminal(TetherError):
    reason = "SAGA_TERMINAL"


class NothingClaimable(TetherError):
    reason = "NOTHING_CLAIMABLE"


class InvalidSagaState(TetherError):
    reason = "INVALID_SAGA_STATE"


class StepNotFound(TetherError):
    reason = "STEP_NOT_FOUND"


class StepConflict(TetherError):
    reason = "STEP_CONFLICT"


class CompensationOutOfOrder(TetherError):
    reason = "COMPENSATION_OUT_OF_ORDER"


class SagaClaimed(TetherError):
    reason = "SAGA_CLAIMED"


class ObjectNotFound(TetherError):
    reason = "OBJECT_NOT_FOUND"


class SweepReportNotFound(TetherError):
    reason = "SWEEP_REPORT_NOT_FOUND"


class ObjectExists(TetherError):
    reason = "OBJECT_EXISTS"


class ObjectTerminating(TetherError):
    reason = "OBJECT_TERMINATING"


class OwnerNotFound(TetherError):
    reason = "OWNER_NOT_FOUND"


class OwnerCycle(TetherError):
    reason = "OWNER_CYCLE"


class UidMismatch(TetherError):
    reason = "UID_MISMATCH"


class ResourceVersionConflict(TetherError):
    reason = "RESOURCE_VERSION_CONFLICT"


class CredentialsRequired(TetherError):
    reason = "CREDENTIALS_REQUIRED"


class InvalidCredentials(TetherError):
    reason = "INVALID_CREDENTIALS"


class NamespaceForbidden(TetherError):
    reason = "NAMESPACE_FORBIDDEN"


class RoleRequired(TetherError):
    reason = "ROLE_REQUIRED"


class ConcurrencyLimit(TetherError):
    reason = "CONCURRENCY_LIMIT"
    retry_after_s = 0.1


class StreamLimit(TetherError):
    reason = "STREAM_LIMIT"


class MessageTooLarge(TetherError):
    reason = "MESSAGE_TOO_LARGE"


class LeaseLimit(TetherError):
    reason = "LEASE_LIMIT"


class WatchLimit(TetherError):
    reason = "WATCH_LIMIT"
