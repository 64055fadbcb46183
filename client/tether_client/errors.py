"""Typed exceptions, chosen by the ``google.rpc.ErrorInfo`` reason a server attaches.

Every error the client raises derives from :class:`TetherError`. A failed call whose
trailers carry an ErrorInfo of domain ``tether.dev`` becomes the class registered for its
reason (``LEASE_HELD`` → :class:`LeaseHeld`); one without becomes the class for its gRPC
status code (:class:`Unavailable`, :class:`DeadlineExceeded`, …). Reason classes also derive
from their code class, so ``except Unavailable`` catches ``StoreUnavailable`` too.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import datetime
from typing import Any, ClassVar

import grpc
from google.rpc import error_details_pb2, status_pb2

from tether_client.pb import common_pb2, saga_pb2

ERROR_DOMAIN = "tether.dev"
STATUS_DETAILS_KEY = "grpc-status-details-bin"


class TetherError(Exception):
    """Base of every tether client error."""

    code: ClassVar[grpc.StatusCode] = grpc.StatusCode.UNKNOWN
    reason: ClassVar[str] = ""

    def __init__(
        self,
        message: str,
        *,
        metadata: Mapping[str, str] | None = None,
        code: grpc.StatusCode | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.metadata: dict[str, str] = dict(metadata or {})
        self.status_code = code if code is not None else type(self).code
        #: The failed gRPC call this error was made from (None for the client's own).
        self.rpc_error: grpc.aio.AioRpcError | None = None

    def __str__(self) -> str:
        label = self.reason or self.status_code.name
        return f"{label}: {self.message}"


# --- by status code (no ErrorInfo, or a reason this client does not know) -------------


class InvalidArgument(TetherError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class FailedPrecondition(TetherError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class NotFound(TetherError):
    code = grpc.StatusCode.NOT_FOUND


class AlreadyExists(TetherError):
    code = grpc.StatusCode.ALREADY_EXISTS


class PermissionDenied(TetherError):
    code = grpc.StatusCode.PERMISSION_DENIED


class Unauthenticated(TetherError):
    code = grpc.StatusCode.UNAUTHENTICATED


class OutOfRange(TetherError):
    code = grpc.StatusCode.OUT_OF_RANGE


class Aborted(TetherError):
    code = grpc.StatusCode.ABORTED


class DeadlineExceeded(TetherError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class Unavailable(TetherError):
    """Transient: the server, the network or the store is not there right now."""

    code = grpc.StatusCode.UNAVAILABLE


class ResourceExhausted(TetherError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class Cancelled(TetherError):
    code = grpc.StatusCode.CANCELLED


class Unimplemented(TetherError):
    code = grpc.StatusCode.UNIMPLEMENTED


class Internal(TetherError):
    code = grpc.StatusCode.INTERNAL


class Unknown(TetherError):
    code = grpc.StatusCode.UNKNOWN


# --- by ErrorInfo reason ----------------------------------------------------------------


def _time(metadata: Mapping[str, str], name: str) -> datetime | None:
    value = metadata.get(name)
    if not value:
        return None
    try:
        return datetime.fromisoformat(value)
    except ValueError:
        return None


class InvalidField(InvalidArgument):
    reason = "INVALID_FIELD"

    @property
    def field(self) -> str:
        return self.metadata.get("field", "")


class MalformedRequest(InvalidArgument):
    reason = "MALFORMED_REQUEST"


class InvalidPageToken(InvalidArgument):
    reason = "INVALID_PAGE_TOKEN"


class LeaseUnavailable(FailedPrecondition):
    """The key cannot be acquired right now (held, or in its lock-delay)."""


class _HeldBy:
    """The facts of a refusal because someone else holds the key."""

    metadata: dict[str, str]

    @property
    def holder(self) -> str:
        return self.metadata.get("holder", "")

    @property
    def expires_at(self) -> datetime | None:
        """When the current holder's lease runs out unless renewed (server clock)."""
        return _time(self.metadata, "expires_at")


class LeaseHeld(_HeldBy, LeaseUnavailable):
    reason = "LEASE_HELD"


class LockDelay(LeaseUnavailable):
    reason = "LOCK_DELAY"

    @property
    def available_at(self) -> datetime | None:
        return _time(self.metadata, "available_at")


class LeaseEnded(FailedPrecondition):
    """The lease is no longer active on the server; it never comes back."""


class LeaseExpired(LeaseEnded):
    reason = "LEASE_EXPIRED"


class LeaseReleased(LeaseEnded):
    reason = "LEASE_RELEASED"


class LeaseRevoked(LeaseEnded):
    reason = "LEASE_REVOKED"


class StaleFencingToken(FailedPrecondition):
    reason = "STALE_FENCING_TOKEN"


class LeaseNotFound(NotFound):
    reason = "LEASE_NOT_FOUND"


class NotLeaseHolder(PermissionDenied):
    reason = "NOT_LEASE_HOLDER"


class AdminRequired(PermissionDenied):
    reason = "ADMIN_REQUIRED"


class RevisionCompacted(OutOfRange):
    reason = "REVISION_COMPACTED"

    @property
    def compact_revision(self) -> int:
        try:
            return int(self.metadata.get("compact_revision", "0"))
        except ValueError:
            return 0


class WaitTimeout(_HeldBy, DeadlineExceeded):
    reason = "WAIT_TIMEOUT"


class KeepAliveIdle(DeadlineExceeded):
    reason = "KEEPALIVE_IDLE"


class StoreUnavailable(Unavailable):
    reason = "STORE_UNAVAILABLE"


class ServerDraining(Unavailable):
    reason = "SERVER_DRAINING"


class RequestIdConflict(AlreadyExists):
    reason = "REQUEST_ID_CONFLICT"


class NotImplementedYet(Unimplemented):
    reason = "NOT_IMPLEMENTED"


class SagaTerminal(FailedPrecondition):
    reason = "SAGA_TERMINAL"


class ResourceVersionConflict(Aborted):
    reason = "RESOURCE_VERSION_CONFLICT"


class OwnerCycle(FailedPrecondition):
    reason = "OWNER_CYCLE"


class SagaNotFound(NotFound):
    reason = "SAGA_NOT_FOUND"


class ObjectNotFound(NotFound):
    reason = "OBJECT_NOT_FOUND"


class NothingClaimable(FailedPrecondition):
    reason = "NOTHING_CLAIMABLE"


class ObjectExists(AlreadyExists):
    """An object of this kind and name exists; its name is free again only once it is gone
    (a terminating one too)."""

    reason = "OBJECT_EXISTS"

    @property
    def uid(self) -> str:
        return self.metadata.get("uid", "")

    @property
    def terminating(self) -> bool:
        return self.metadata.get("terminating", "").lower() == "true"


class ObjectTerminating(FailedPrecondition):
    """The object is terminating: no finalizer can be added and its deletion is final."""

    reason = "OBJECT_TERMINATING"

    @property
    def uid(self) -> str:
        return self.metadata.get("uid", "")

    @property
    def deletion_timestamp(self) -> datetime | None:
        return _time(self.metadata, "deletion_timestamp")


class OwnerNotFound(FailedPrecondition):
    """An owner reference names no live owner in the namespace (an absent uid, an ended
    lease)."""

    reason = "OWNER_NOT_FOUND"

    @property
    def owner_uid(self) -> str:
        return self.metadata.get("owner_uid", "")

    @property
    def owner_kind(self) -> str:
        return self.metadata.get("owner_kind", "")


class UidMismatch(FailedPrecondition):
    """The object has another uid than the request expected: it was deleted and recreated."""

    reason = "UID_MISMATCH"

    @property
    def uid(self) -> str:
        return self.metadata.get("uid", "")

    @property
    def expected_uid(self) -> str:
        return self.metadata.get("expected_uid", "")


class SweepReportNotFound(NotFound):
    """No stored sweep report has this id (never written, or purged by retention)."""

    reason = "SWEEP_REPORT_NOT_FOUND"


class ServerStarting(Unavailable):
    """The server is still recovering after its start; retry shortly."""

    reason = "SERVER_STARTING"


class CredentialsRequired(Unauthenticated):
    """The server needs a bearer token or a client certificate; the call had neither."""

    reason = "CREDENTIALS_REQUIRED"


class InvalidCredentials(Unauthenticated):
    """The bearer token is malformed or unknown to the server."""

    reason = "INVALID_CREDENTIALS"


class NamespaceForbidden(PermissionDenied):
    """The principal has no role in the call's namespace."""

    reason = "NAMESPACE_FORBIDDEN"


class RoleRequired(PermissionDenied):
    """The principal's role in the namespace is not enough; ``required_role`` says which."""

    reason = "ROLE_REQUIRED"

    @property
    def required_role(self) -> str:
        return self.metadata.get("required_role", "")


class ConcurrencyLimit(ResourceExhausted):
    """The server answers as many calls at once as it allows; retry with backoff."""

    reason = "CONCURRENCY_LIMIT"


class StreamLimit(ResourceExhausted):
    """This connection has as many open streams as the server allows."""

    reason = "STREAM_LIMIT"


class MessageTooLarge(ResourceExhausted):
    """A request message is larger than the server accepts."""

    reason = "MESSAGE_TOO_LARGE"


class LeaseLimit(ResourceExhausted):
    """The principal holds as many live leases as the server allows."""

    reason = "LEASE_LIMIT"


class WatchLimit(ResourceExhausted):
    """The principal has as many open watches as the server allows."""

    reason = "WATCH_LIMIT"


class _StepIndexed:
    """The facts of a refusal about one step of a saga."""

    metadata: dict[str, str]

    @property
    def step_index(self) -> int | None:
        try:
            return int(self.metadata["step_index"])
        except (KeyError, ValueError):
            return None


class InvalidSagaState(FailedPrecondition):
    """The saga's state does not allow the call (a step on a COMPENSATING saga, a claim ended
    by a cancel, a deadline or an operator)."""

    reason = "INVALID_SAGA_STATE"

    @property
    def state(self) -> str:
        """The saga's state by its proto name (``SAGA_STATE_COMPENSATING``), or empty."""
        return self.metadata.get("state", "")


class StepNotFound(_StepIndexed, NotFound):
    reason = "STEP_NOT_FOUND"


class StepConflict(_StepIndexed, FailedPrecondition):
    """The step record conflicts with the log: another name at this index, or a status the
    step cannot move to."""

    reason = "STEP_CONFLICT"


class CompensationOutOfOrder(FailedPrecondition):
    reason = "COMPENSATION_OUT_OF_ORDER"

    @property
    def next_step_index(self) -> int | None:
        """The step whose compensation must be reported first."""
        try:
            return int(self.metadata["next_step_index"])
        except (KeyError, ValueError):
            return None


class SagaClaimed(FailedPrecondition):
    """Another worker's live claim holds the saga."""

    reason = "SAGA_CLAIMED"

    @property
    def holder(self) -> str:
        return self.metadata.get("holder", "")


# --- raised by the client itself ----------------------------------------------------------


class ClientClosed(Cancelled):
    """A call on a client that was closed."""


class TokenOverPlaintext(ValueError):
    """A bearer token would go unencrypted to a target that is not on this host.

    Raised when a client is built, never by a call: it is a mistake in the client's
    configuration, not a server's answer, so it is a ``ValueError`` like other bad
    arguments and not a :class:`TetherError`. Connect with TLS (``credentials=``) or,
    knowing the token can be read on the way, pass ``insecure_token=True``.
    """


class SagaAlreadyEnded(SagaTerminal):
    """``run_saga`` on a saga that had already ended other than COMPLETED (a completed one
    is replayed instead): ``state`` names its end (``COMPENSATED``, ``CANCELLED``, ...)."""

    def __init__(self, message: str, *, saga_id: str, state: str, namespace: str = "") -> None:
        super().__init__(
            message, metadata={"saga_id": saga_id, "state": state, "namespace": namespace}
        )
        self.saga_id = saga_id
        self.state = state

    @classmethod
    def of(cls, saga: saga_pb2.Saga) -> SagaAlreadyEnded:
        """For a ``Saga`` message that has ended."""
        state = saga_pb2.SagaState.Name(saga.state).removeprefix("SAGA_STATE_")
        return cls(
            f"saga {saga.saga_id!r} has already ended: {state}",
            saga_id=saga.saga_id,
            state=state,
            namespace=saga.namespace,
        )


class LeaseNotHeld(TetherError):
    """A held lease was used after it ended: released by this client, or lost."""

    code = grpc.StatusCode.FAILED_PRECONDITION
    reason = "LEASE_NOT_HELD"


class LeaseLost(LeaseNotHeld):
    """The client can no longer be sure the server considers the lease live.

    Raised by every use of a lost lease's fencing token, and out of ``hold()`` when the body
    was cancelled because of the loss. ``cause`` is the server's refusal when there was one
    (``LeaseExpired``, ``LeaseRevoked``, …), None when the safety deadline ran out first.
    """

    reason = "LEASE_LOST"

    def __init__(self, message: str, *, cause: TetherError | None = None) -> None:
        super().__init__(message)
        self.cause = cause


def _all_subclasses(cls: type[TetherError]) -> list[type[TetherError]]:
    found: list[type[TetherError]] = []
    for sub in cls.__subclasses__():
        found.append(sub)
        found.extend(_all_subclasses(sub))
    return found


_CLIENT_SIDE = {LeaseNotHeld, LeaseLost}
BY_REASON: dict[str, type[TetherError]] = {
    cls.reason: cls
    for cls in _all_subclasses(TetherError)
    if cls.reason and cls not in _CLIENT_SIDE and "reason" in cls.__dict__
}
BY_CODE: dict[grpc.StatusCode, type[TetherError]] = {
    cls.code: cls
    for cls in _all_subclasses(TetherError)
    if not cls.reason and "code" in cls.__dict__
}


def error_for(
    code: grpc.StatusCode, reason: str, message: str, metadata: Mapping[str, str]
) -> TetherError:
    """The typed error for a status code and (possibly empty) ErrorInfo reason."""
    cls = BY_REASON.get(reason)
    if cls is None or cls.code != code:
        # A reason this client does not know (a newer server), or one arriving with an
        # unexpected code: the code decides, the reason stays readable in the metadata.
        cls = BY_CODE.get(code, Unknown)
        metadata = {**metadata, "reason": reason} if reason else metadata
    return cls(message, metadata=metadata, code=code)


def _error_info(metadata: Iterable[Any] | None) -> error_details_pb2.ErrorInfo | None:
    for key, value in metadata or ():
        if key != STATUS_DETAILS_KEY or not isinstance(value, bytes):
            continue
        try:
            status = status_pb2.Status.FromString(value)
        except Exception:  # a foreign proxy's garbage must not hide the real error
            return None
        for detail in status.details:
            info = error_details_pb2.ErrorInfo()
            if detail.Is(info.DESCRIPTOR) and detail.Unpack(info):
                return info
    return None


def from_rpc_error(exc: grpc.aio.AioRpcError) -> TetherError:
    """The typed error for a failed call."""
    info = _error_info(exc.trailing_metadata())
    reason = ""
    metadata: dict[str, str] = {}
    if info is not None and info.domain == ERROR_DOMAIN:
        reason = info.reason
        metadata = dict(info.metadata)
    error = error_for(exc.code(), reason, exc.details() or "", metadata)
    # Kept, not chained: the typed error says all there is; a traceback shows the caller's
    # frames, not gRPC's.
    error.rpc_error = exc
    error.__suppress_context__ = True
    return error


_CODE_BY_NUMBER: dict[int, grpc.StatusCode] = {c.value[0]: c for c in grpc.StatusCode}


def from_error_detail(detail: common_pb2.ErrorDetail) -> TetherError:
    """The typed error for one failed item of a batch (a KeepAlive result)."""
    code = _CODE_BY_NUMBER.get(detail.code, grpc.StatusCode.UNKNOWN)
    return error_for(code, detail.reason, detail.message, dict(detail.metadata))


__all__ = [
    "BY_CODE",
    "BY_REASON",
    "ERROR_DOMAIN",
    "Aborted",
    "AdminRequired",
    "AlreadyExists",
    "Cancelled",
    "ClientClosed",
    "CompensationOutOfOrder",
    "ConcurrencyLimit",
    "CredentialsRequired",
    "DeadlineExceeded",
    "FailedPrecondition",
    "Internal",
    "InvalidArgument",
    "InvalidCredentials",
    "InvalidField",
    "InvalidPageToken",
    "InvalidSagaState",
    "KeepAliveIdle",
    "LeaseEnded",
    "LeaseExpired",
    "LeaseHeld",
    "LeaseLimit",
    "LeaseLost",
    "LeaseNotFound",
    "LeaseNotHeld",
    "LeaseReleased",
    "LeaseRevoked",
    "LeaseUnavailable",
    "LockDelay",
    "MalformedRequest",
    "MessageTooLarge",
    "NamespaceForbidden",
    "NotFound",
    "NotImplementedYet",
    "NotLeaseHolder",
    "NothingClaimable",
    "ObjectExists",
    "ObjectNotFound",
    "ObjectTerminating",
    "OutOfRange",
    "OwnerCycle",
    "OwnerNotFound",
    "PermissionDenied",
    "RequestIdConflict",
    "ResourceExhausted",
    "ResourceVersionConflict",
    "RevisionCompacted",
    "RoleRequired",
    "SagaAlreadyEnded",
    "SagaClaimed",
    "SagaNotFound",
    "SagaTerminal",
    "ServerDraining",
    "ServerStarting",
    "StaleFencingToken",
    "StepConflict",
    "StepNotFound",
    "StoreUnavailable",
    "StreamLimit",
    "SweepReportNotFound",
    "TetherError",
    "TokenOverPlaintext",
    "UidMismatch",
    "Unauthenticated",
    "Unavailable",
    "Unimplemented",
    "Unknown",
    "WaitTimeout",
    "WatchLimit",
    "error_for",
    "from_error_detail",
    "from_rpc_error",
]
