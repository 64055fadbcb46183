"""Domain errors. Each names its ErrorInfo reason and the facts a client needs.

The service layer maps them to gRPC status codes in one table (services/errors.py); the
domain and the store only raise them.

Each reason declares its ErrorInfo metadata keys: ``keys`` it always carries and
``optional_keys`` it carries in some cases (common.proto and docs/errors.md say which). A
construction outside them raises TypeError: the keys are a contract with clients in every
language, and tests check the three places agree. Metadata values follow one spelling:
times in RFC 3339 UTC, durations like "1.5s", integers in decimal, states and enums by
their proto value name (LEASE_STATE_EXPIRED), reasons without the ERROR_REASON_ prefix.
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
    keys: ClassVar[frozenset[str]] = frozenset()
    optional_keys: ClassVar[frozenset[str]] = frozenset()
    # Seconds a client should wait before retrying (sent as google.rpc.RetryInfo); None
    # when a retry cannot help.
    retry_after_s: ClassVar[float | None] = None

    def __post_init__(self) -> None:
        given = set(self.metadata)
        missing = self.keys - given
        undeclared = given - self.keys - self.optional_keys
        if missing or undeclared:
            raise TypeError(
                f"{type(self).__name__} metadata off its contract: missing {sorted(missing)},"
                f" undeclared {sorted(undeclared)}"
            )

    def __str__(self) -> str:
        return self.message


def _keys(*names: str) -> frozenset[str]:
    return frozenset(names)


class InvalidField(TetherError):
    reason = "INVALID_FIELD"
    keys = _keys("field")

    def __init__(self, field_name: str, message: str) -> None:
        super().__init__(f"{field_name}: {message}", {"field": field_name})
        self.field_name = field_name


class MalformedRequest(TetherError):
    reason = "MALFORMED_REQUEST"
    keys = _keys("method")


class InvalidPageToken(TetherError):
    reason = "INVALID_PAGE_TOKEN"
    keys = _keys("field")

    def __init__(self, message: str = "page token is malformed or belongs to another query"):
        super().__init__(message, {"field": "page_token"})


class LeaseHeld(TetherError):
    reason = "LEASE_HELD"
    keys = _keys("key", "holder", "expires_at")
    optional_keys = _keys("lease_id", "fencing_token")


class LockDelay(TetherError):
    reason = "LOCK_DELAY"
    keys = _keys("key", "available_at")


class WaitTimeout(TetherError):
    reason = "WAIT_TIMEOUT"
    keys = _keys("cause")
    optional_keys = _keys(
        "key", "holder", "expires_at", "lease_id", "fencing_token", "available_at"
    )


class LeaseNotFound(TetherError):
    reason = "LEASE_NOT_FOUND"
    keys = _keys("namespace")
    optional_keys = _keys("lease_id", "key")


class LeaseExpired(TetherError):
    reason = "LEASE_EXPIRED"
    keys = _keys("lease_id", "state", "expires_at")


class LeaseReleased(TetherError):
    reason = "LEASE_RELEASED"
    keys = _keys("lease_id", "state")


class LeaseRevoked(TetherError):
    reason = "LEASE_REVOKED"
    keys = _keys("lease_id", "state")


class StaleFencingToken(TetherError):
    reason = "STALE_FENCING_TOKEN"
    keys = _keys("lease_id", "presented_token")
    optional_keys = _keys("current_token", "saga_id")


class NotLeaseHolder(TetherError):
    reason = "NOT_LEASE_HOLDER"
    keys = _keys("lease_id", "holder")


class AdminRequired(TetherError):
    reason = "ADMIN_REQUIRED"
    keys = _keys("principal", "namespace", "method", "required_role", "role")


class RevisionCompacted(TetherError):
    reason = "REVISION_COMPACTED"
    keys = _keys("compact_revision", "requested_revision")


class KeepAliveIdle(TetherError):
    reason = "KEEPALIVE_IDLE"
    keys = _keys("idle_timeout")


class StoreUnavailable(TetherError):
    reason = "STORE_UNAVAILABLE"
    retry_after_s = 0.5


class ServerDraining(TetherError):
    reason = "SERVER_DRAINING"
    keys = _keys("instance_id")


class ServerStarting(TetherError):
    reason = "SERVER_STARTING"
    retry_after_s = 1.0


class RequestIdConflict(TetherError):
    reason = "REQUEST_ID_CONFLICT"
    optional_keys = _keys("request_id", "lease_id", "uid", "saga_id")


class NotImplementedYet(TetherError):
    reason = "NOT_IMPLEMENTED"


class SagaNotFound(TetherError):
    reason = "SAGA_NOT_FOUND"
    keys = _keys("saga_id", "namespace")


class SagaTerminal(TetherError):
    reason = "SAGA_TERMINAL"
    keys = _keys("saga_id", "state")


class NothingClaimable(TetherError):
    reason = "NOTHING_CLAIMABLE"
    optional_keys = _keys("kind", "purpose", "saga_id", "not_before")


class InvalidSagaState(TetherError):
    reason = "INVALID_SAGA_STATE"
    keys = _keys("saga_id", "state")


class StepNotFound(TetherError):
    reason = "STEP_NOT_FOUND"
    keys = _keys("saga_id", "step_index")


class StepConflict(TetherError):
    reason = "STEP_CONFLICT"
    keys = _keys("saga_id", "step_index", "step")


class CompensationOutOfOrder(TetherError):
    reason = "COMPENSATION_OUT_OF_ORDER"
    keys = _keys("saga_id", "next_step_index")


class SagaClaimed(TetherError):
    reason = "SAGA_CLAIMED"
    keys = _keys("saga_id", "holder")
    optional_keys = _keys("expires_at")


class ObjectNotFound(TetherError):
    reason = "OBJECT_NOT_FOUND"
    keys = _keys("namespace", "kind", "name", "uid")


class SweepReportNotFound(TetherError):
    reason = "SWEEP_REPORT_NOT_FOUND"
    keys = _keys("sweep_id")


class ObjectExists(TetherError):
    reason = "OBJECT_EXISTS"
    keys = _keys("uid", "terminating")


class ObjectTerminating(TetherError):
    reason = "OBJECT_TERMINATING"
    keys = _keys("uid", "deletion_timestamp")


class OwnerNotFound(TetherError):
    reason = "OWNER_NOT_FOUND"
    keys = _keys("owner_uid", "owner_kind")


class OwnerCycle(TetherError):
    reason = "OWNER_CYCLE"
    keys = _keys("uid", "owner_uid")


class UidMismatch(TetherError):
    reason = "UID_MISMATCH"
    keys = _keys("uid", "expected_uid")


class ResourceVersionConflict(TetherError):
    reason = "RESOURCE_VERSION_CONFLICT"
    keys = _keys("resource_version", "expected")


class CredentialsRequired(TetherError):
    reason = "CREDENTIALS_REQUIRED"


class InvalidCredentials(TetherError):
    reason = "INVALID_CREDENTIALS"


class NamespaceForbidden(TetherError):
    reason = "NAMESPACE_FORBIDDEN"
    keys = _keys("principal", "namespace", "method")


class RoleRequired(TetherError):
    reason = "ROLE_REQUIRED"
    keys = _keys("principal", "namespace", "method")
    optional_keys = _keys("required_role", "role")


class ConcurrencyLimit(TetherError):
    reason = "CONCURRENCY_LIMIT"
    keys = _keys("limit")
    retry_after_s = 0.1


class StreamLimit(TetherError):
    reason = "STREAM_LIMIT"
    keys = _keys("limit")


class MessageTooLarge(TetherError):
    reason = "MESSAGE_TOO_LARGE"
    keys = _keys("method", "limit_bytes", "size_bytes")


class LeaseLimit(TetherError):
    reason = "LEASE_LIMIT"
    keys = _keys("principal", "limit")


class WatchLimit(TetherError):
    reason = "WATCH_LIMIT"
    keys = _keys("principal", "limit")
