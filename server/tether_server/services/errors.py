"""The one table from domain errors to gRPC status codes, and rich error details.

Every refusal carries a google.rpc.Status with a google.rpc.ErrorInfo (domain "tether.dev",
reason = the domain error's reason, metadata = the facts a client needs) in the
``grpc-status-details-bin`` trailer, readable by grpcurl and every gRPC language.
"""

from __future__ import annotations

from datetime import timedelta

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from tether_client.pb import common_pb2
from tether_server.domain import errors

ERROR_DOMAIN = "tether.dev"

_CODES: dict[type[errors.TetherError], grpc.StatusCode] = {
    errors.InvalidField: grpc.StatusCode.INVALID_ARGUMENT,
    errors.MalformedRequest: grpc.StatusCode.INVALID_ARGUMENT,
    errors.InvalidPageToken: grpc.StatusCode.INVALID_ARGUMENT,
    errors.LeaseHeld: grpc.StatusCode.FAILED_PRECONDITION,
    errors.LockDelay: grpc.StatusCode.FAILED_PRECONDITION,
    errors.LeaseExpired: grpc.StatusCode.FAILED_PRECONDITION,
    errors.LeaseReleased: grpc.StatusCode.FAILED_PRECONDITION,
    errors.LeaseRevoked: grpc.StatusCode.FAILED_PRECONDITION,
    errors.StaleFencingToken: grpc.StatusCode.FAILED_PRECONDITION,
    errors.WaitTimeout: grpc.StatusCode.DEADLINE_EXCEEDED,
    errors.KeepAliveIdle: grpc.StatusCode.DEADLINE_EXCEEDED,
    errors.LeaseNotFound: grpc.StatusCode.NOT_FOUND,
    errors.NotLeaseHolder: grpc.StatusCode.PERMISSION_DENIED,
    errors.AdminRequired: grpc.StatusCode.PERMISSION_DENIED,
    errors.RevisionCompacted: grpc.StatusCode.OUT_OF_RANGE,
    errors.StoreUnavailable: grpc.StatusCode.UNAVAILABLE,
    errors.ServerDraining: grpc.StatusCode.UNAVAILABLE,
    errors.RequestIdConflict: grpc.StatusCode.ALREADY_EXISTS,
    errors.NotImplementedYet: grpc.StatusCode.UNIMPLEMENTED,
    errors.SagaNotFound: grpc.StatusCode.NOT_FOUND,
    errors.SagaTerminal: grpc.StatusCode.FAILED_PRECONDITION,
    errors.NothingClaimable: grpc.StatusCode.FAILED_PRECONDITION,
    errors.InvalidSagaState: grpc.StatusCode.FAILED_PRECONDITION,
    errors.StepNotFound: grpc.StatusCode.NOT_FOUND,
    errors.StepConflict: grpc.StatusCode.FAILED_PRECONDITION,
    errors.CompensationOutOfOrder: grpc.StatusCode.FAILED_PRECONDITION,
    errors.SagaClaimed: grpc.StatusCode.FAILED_PRECONDITION,
    errors.ObjectNotFound: grpc.StatusCode.NOT_FOUND,
    errors.ObjectExists: grpc.StatusCode.ALREADY_EXISTS,
    errors.ObjectTerminating: grpc.StatusCode.FAILED_PRECONDITION,
    errors.OwnerNotFound: grpc.StatusCode.FAILED_PRECONDITION,
    errors.OwnerCycle: grpc.StatusCode.FAILED_PRECONDITION,
    errors.UidMismatch: grpc.StatusCode.FAILED_PRECONDITION,
    errors.ResourceVersionConflict: grpc.StatusCode.ABORTED,
    errors.SweepReportNotFound: grpc.StatusCode.NOT_FOUND,
    errors.ServerStarting: grpc.StatusCode.UNAVAILABLE,
    errors.CredentialsRequired: grpc.StatusCode.UNAUTHENTICATED,
    errors.InvalidCredentials: grpc.StatusCode.UNAUTHENTICATED,
    errors.NamespaceForbidden: grpc.StatusCode.PERMISSION_DENIED,
    errors.RoleRequired: grpc.StatusCode.PERMISSION_DENIED,
    errors.ConcurrencyLimit: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.StreamLimit: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.MessageTooLarge: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.LeaseLimit: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.WatchLimit: grpc.StatusCode.RESOURCE_EXHAUSTED,
}


def status_code(error: errors.TetherError) -> grpc.StatusCode:
    return code_for(type(error))


def code_for(error_class: type[errors.TetherError]) -> grpc.StatusCode:
    for cls in error_class.__mro__:
        code = _CODES.get(cls)
        if code is not None:
            return code
    return grpc.StatusCode.INTERNAL


def to_grpc_status(error: errors.TetherError) -> grpc.Status:
    code = status_code(error)
    info = error_details_pb2.ErrorInfo(
        reason=error.reason, domain=ERROR_DOMAIN, metadata=dict(error.metadata)
    )
    detail = any_pb2.Any()
    detail.Pack(info)
    details = [detail]
    if error.retry_after_s is not None:
        advice = any_pb2.Any()
        delay = duration_pb2.Duration()
        delay.FromTimedelta(timedelta(seconds=error.retry_after_s))
        advice.Pack(error_details_pb2.RetryInfo(retry_delay=delay))
        details.append(advice)
    status = status_pb2.Status(code=code.value[0], message=error.message, details=details)
    return rpc_status.to_status(status)


def to_error_detail(error: errors.TetherError) -> common_pb2.ErrorDetail:
    """The same facts for one failed item of a batch (KeepAlive results)."""
    return common_pb2.ErrorDetail(
        code=status_code(error).value[0],
        reason=error.reason,
        message=error.message,
        metadata=dict(error.metadata),
    )
