"""Saga protobuf <-> domain conversions (Struct and Value fields carry JSON)."""

from __future__ import annotations

import math
from typing import Any

from google.protobuf import struct_pb2

from tether_client.pb import common_pb2, saga_pb2
from tether_server.domain import saga as domain
from tether_server.domain.errors import InvalidField
from tether_server.domain.saga import (
    Annotation,
    CompensationRecord,
    CompStatus,
    OnStale,
    Purpose,
    RedriveMode,
    SagaEventType,
    SagaState,
    Step,
    StepStatus,
)
from tether_server.services.convert import to_timestamp
from tether_server.store.sagas import SagaView

# By the names error metadata also uses (proto_name): one spelling everywhere.
STATE_TO_PB = {state: saga_pb2.SagaState.Value(state.proto_name) for state in SagaState}
STATE_FROM_PB = {v: k for k, v in STATE_TO_PB.items()}
ON_STALE_TO_PB = {
    OnStale.REQUEUE: saga_pb2.ON_STALE_POLICY_REQUEUE,
    OnStale.COMPENSATE: saga_pb2.ON_STALE_POLICY_COMPENSATE,
    OnStale.QUARANTINE: saga_pb2.ON_STALE_POLICY_QUARANTINE,
}
ON_STALE_FROM_PB = {v: k for k, v in ON_STALE_TO_PB.items()}
PURPOSE_TO_PB = {purpose: saga_pb2.ClaimPurpose.Value(purpose.proto_name) for purpose in Purpose}
PURPOSE_FROM_PB = {v: k for k, v in PURPOSE_TO_PB.items()}
STEP_STATUS_TO_PB = {
    StepStatus.STARTED: saga_pb2.STEP_STATUS_STARTED,
    StepStatus.SUCCEEDED: saga_pb2.STEP_STATUS_SUCCEEDED,
    StepStatus.FAILED: saga_pb2.STEP_STATUS_FAILED,
}
STEP_STATUS_FROM_PB = {v: k for k, v in STEP_STATUS_TO_PB.items()}
COMP_STATUS_TO_PB = {
    CompStatus.PENDING: saga_pb2.COMPENSATION_STATUS_PENDING,
    CompStatus.SUCCEEDED: saga_pb2.COMPENSATION_STATUS_SUCCEEDED,
    CompStatus.FAILED: saga_pb2.COMPENSATION_STATUS_FAILED,
    CompStatus.EXHAUSTED: saga_pb2.COMPENSATION_STATUS_EXHAUSTED,
    CompStatus.MANUAL: saga_pb2.COMPENSATION_STATUS_MANUAL,
}
REDRIVE_FROM_PB = {
    saga_pb2.REDRIVE_MODE_RETRY_COMPENSATIONS: RedriveMode.RETRY_COMPENSATIONS,
    saga_pb2.REDRIVE_MODE_RESUME: RedriveMode.RESUME,
}
EVENT_TO_PB = {
    SagaEventType.CREATED: saga_pb2.SAGA_EVENT_TYPE_CREATED,
    SagaEventType.CLAIMED: saga_pb2.SAGA_EVENT_TYPE_CLAIMED,
    SagaEventType.STEP_RECORDED: saga_pb2.SAGA_EVENT_TYPE_STEP_RECORDED,
    SagaEventType.STATE_CHANGED: saga_pb2.SAGA_EVENT_TYPE_STATE_CHANGED,
    SagaEventType.ANNOTATED: saga_pb2.SAGA_EVENT_TYPE_ANNOTATED,
    SagaEventType.COMPENSATION_RECORDED: saga_pb2.SAGA_EVENT_TYPE_COMPENSATION_RECORDED,
    SagaEventType.CLAIM_ENDED: saga_pb2.SAGA_EVENT_TYPE_CLAIM_ENDED,
}


def enum_value(table: dict[Any, Any], value: int, field_name: str, what: str) -> Any:
    found = table.get(value)
    if found is None:
        raise InvalidField(field_name, f"{value} is not a valid {what}")
    return found


def struct_to_dict(message: struct_pb2.Struct, field_name: str, max_bytes: int) -> dict[str, Any]:
    """The Struct as Python data, bounded by its encoded size; NaN and infinities refused
    (JSON has none)."""
    _check_size(message, field_name, max_bytes)
    return {key: _python(item, field_name) for key, item in message.fields.items()}


def value_to_python(message: struct_pb2.Value, field_name: str, max_bytes: int) -> Any:
    """The Value as Python data (None when unset), bounded like ``struct_to_dict``."""
    if message.WhichOneof("kind") is None:
        return None
    _check_size(message, field_name, max_bytes)
    return _python(message, field_name)


def _check_size(message: struct_pb2.Struct | struct_pb2.Value, field_name: str, limit: int) -> None:
    size = message.ByteSize()
    if size > limit:
        raise InvalidField(field_name, f"is {size} bytes encoded; at most {limit}")


def _python(value: struct_pb2.Value, field_name: str) -> Any:
    kind = value.WhichOneof("kind")
    if kind == "string_value":
        return value.string_value
    if kind == "number_value":
        number = value.number_value
        if not math.isfinite(number):
            raise InvalidField(field_name, "must not contain NaN or infinite numbers")
        return int(number) if number.is_integer() and abs(number) < 2**53 else number
    if kind == "bool_value":
        return value.bool_value
    if kind == "struct_value":
        return {k: _python(v, field_name) for k, v in value.struct_value.fields.items()}
    if kind == "list_value":
        return [_python(v, field_name) for v in value.list_value.values]
    return None


def to_value(value: Any) -> struct_pb2.Value:
    holder = struct_pb2.Struct()
    holder.update({"v": value})
    return holder.fields["v"]


def to_struct(value: Any) -> struct_pb2.Struct:
    message = struct_pb2.Struct()
    message.update(value)
    return message


def compensation_to_pb(spec: domain.CompensationSpec) -> saga_pb2.Compensation:
    message = saga_pb2.Compensation(name=spec.name, max_attempts=spec.max_attempts)
    if spec.payload is not None:
        message.payload.CopyFrom(to_value(spec.payload))
    return message


def step_to_pb(step: Step) -> saga_pb2.SagaStep:
    message = saga_pb2.SagaStep(
        index=step.index,
        name=step.name,
        status=STEP_STATUS_TO_PB[step.status],
        error=step.error,
        attempt=step.attempt,
    )
    if step.output is not None:
        message.output.CopyFrom(to_value(step.output))
    if step.compensation is not None:
        message.compensation.CopyFrom(compensation_to_pb(step.compensation))
    if step.started_at_us is not None:
        message.started_at.CopyFrom(to_timestamp(step.started_at_us))
    if step.finished_at_us is not None:
        message.finished_at.CopyFrom(to_timestamp(step.finished_at_us))
    return message


def comp_to_pb(record: CompensationRecord) -> saga_pb2.CompensationRecord:
    message = saga_pb2.CompensationRecord(
        step_index=record.step_index,
        name=record.name,
        status=COMP_STATUS_TO_PB[record.status],
        attempts=record.attempts,
        max_attempts=record.max_attempts,
        error=record.error,
        updated_at=to_timestamp(record.updated_at_us),
        marked_by=record.marked_by,
    )
    if record.payload is not None:
        message.payload.CopyFrom(to_value(record.payload))
    return message


def annotation_to_pb(annotation: Annotation) -> common_pb2.Annotation:
    return common_pb2.Annotation(
        created_at=to_timestamp(annotation.created_at_us),
        author=annotation.author,
        text=annotation.text,
        attributes=dict(annotation.attributes),
    )


def saga_to_pb(saga: domain.Saga, *, stale: bool = False, overdue: bool = False) -> saga_pb2.Saga:
    message = saga_pb2.Saga(
        namespace=saga.namespace,
        saga_id=saga.saga_id,
        kind=saga.kind,
        state=STATE_TO_PB[saga.state],
        labels=dict(saga.labels),
        on_stale=ON_STALE_TO_PB[saga.on_stale],
        max_attempts=saga.max_attempts,
        attempt=saga.attempt,
        stale=stale,
        overdue=overdue,
        progress=saga.progress,
        failure_reason=saga.failure_reason,
        not_before=to_timestamp(saga.not_before_us),
        created_at=to_timestamp(saga.created_at_us),
        updated_at=to_timestamp(saga.updated_at_us),
        create_revision=saga.create_revision,
        revision=saga.mod_revision,
    )
    message.input.update(dict(saga.input))
    if saga.owner is not None:
        message.owner.CopyFrom(common_pb2.OwnerReference(**saga.owner))
    claim = saga.claim
    if claim is not None and claim.active:
        message.claim.CopyFrom(
            common_pb2.Fence(lease_id=claim.lease_id, fencing_token=claim.fencing_token)
        )
        message.claim_purpose = PURPOSE_TO_PB[claim.purpose]
        message.holder = claim.holder
    if saga.output is not None:
        message.output.update(dict(saga.output))
    if saga.deadline_us is not None:
        message.deadline.CopyFrom(to_timestamp(saga.deadline_us))
    if saga.ended_at_us is not None:
        message.ended_at.CopyFrom(to_timestamp(saga.ended_at_us))
    return message


def view_to_pb(view: SagaView, *, logs: bool = True) -> saga_pb2.Saga:
    message = saga_to_pb(view.saga, stale=view.stale, overdue=view.overdue)
    if logs:
        message.steps.extend(step_to_pb(s) for s in view.steps)
        message.compensations.extend(comp_to_pb(c) for c in view.compensations)
        message.annotations.extend(annotation_to_pb(a) for a in view.annotations)
    return message
