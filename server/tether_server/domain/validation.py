"""Input validation: bounds and shapes, each failure naming its field. Pure."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

from tether_server.domain.errors import InvalidField

DEFAULT_NAMESPACE = "default"
_NAMESPACE = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")
_LABEL_KEY = re.compile(
    r"([a-z0-9]([-a-z0-9.]*[a-z0-9])?/)?[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?"
)
# C0, DEL and C1 control characters.
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


@dataclass(frozen=True)
class Limits:
    min_ttl_us: int = 1_000_000
    max_ttl_us: int = 3_600_000_000
    max_wait_us: int = 300_000_000
    max_lock_delay_us: int = 60_000_000
    max_key_bytes: int = 512
    max_holder_bytes: int = 256
    max_request_id_bytes: int = 128
    max_labels: int = 64
    max_label_key_bytes: int = 63
    max_label_value_bytes: int = 256
    max_progress_bytes: int = 64 * 1024
    max_page_size: int = 1000
    default_page_size: int = 100
    max_renewals_per_request: int = 10_000
    max_reason_bytes: int = 1024


def namespace(value: str) -> str:
    if value == "":
        return DEFAULT_NAMESPACE
    if not _NAMESPACE.fullmatch(value):
        raise InvalidField(
            "namespace", "must be a DNS label: 1-63 of a-z, 0-9 and '-', alphanumeric at both ends"
        )
    return value


def _bounded_text(field_name: str, value: str, max_bytes: int, *, required: bool) -> str:
    size = len(value.encode())
    if size == 0:
        if required:
            raise InvalidField(field_name, "must not be empty")
        return value
    if size > max_bytes:
        raise InvalidField(field_name, f"is {size} bytes; at most {max_bytes}")
    if _CONTROL.search(value):
        raise InvalidField(field_name, "must not contain control characters")
    if value != value.strip():
        raise InvalidField(field_name, "must not start or end with whitespace")
    return value


def key(value: str, limits: Limits, field_name: str = "key") -> str:
    return _bounded_text(field_name, value, limits.max_key_bytes, required=True)


def key_prefix(value: str, limits: Limits) -> str:
    return _bounded_text("key_prefix", value, limits.max_key_bytes, required=False)


def holder(value: str, limits: Limits, field_name: str = "holder") -> str:
    return _bounded_text(field_name, value, limits.max_holder_bytes, required=True)


def optional_holder(value: str, limits: Limits) -> str:
    return _bounded_text("holder", value, limits.max_holder_bytes, required=False)


def request_id(value: str, limits: Limits) -> str | None:
    text = _bounded_text("request_id", value, limits.max_request_id_bytes, required=False)
    return text or None


def lease_id(value: str, field_name: str = "lease_id") -> str:
    if not value:
        raise InvalidField(field_name, "must not be empty")
    if len(value) > 64 or not value.isascii() or not value.replace("-", "").isalnum():
        raise InvalidField(field_name, "is not a lease id issued by this server")
    return value


# Tokens are stored as signed 64-bit integers; no lease is ever granted a larger one.
MAX_FENCING_TOKEN = 2**63 - 1


def fencing_token(value: int, field_name: str = "fencing_token") -> int:
    if not 0 < value <= MAX_FENCING_TOKEN:
        raise InvalidField(field_name, "must be the positive token the lease was granted with")
    return value


def ttl(value_us: int, limits: Limits, field_name: str = "ttl") -> int:
    if not limits.min_ttl_us <= value_us <= limits.max_ttl_us:
        raise InvalidField(
            field_name,
            f"must be between {limits.min_ttl_us / 1e6:g}s and {limits.max_ttl_us / 1e6:g}s",
        )
    return value_us


def wait(value_us: int, limits: Limits) -> int:
    if not 0 <= value_us <= limits.max_wait_us:
        raise InvalidField("wait", f"must be between 0s and {limits.max_wait_us / 1e6:g}s")
    return value_us


def lock_delay(value_us: int, limits: Limits) -> int:
    if not 0 <= value_us <= limits.max_lock_delay_us:
        raise InvalidField(
            "lock_delay", f"must be between 0s and {limits.max_lock_delay_us / 1e6:g}s"
        )
    return value_us


def labels(value: Mapping[str, str], limits: Limits) -> dict[str, str]:
    if len(value) > limits.max_labels:
        raise InvalidField("labels", f"has {len(value)} entries; at most {limits.max_labels}")
    for label_key, label_value in value.items():
        prefix, _, name = label_key.rpartition("/")
        too_long = len(name) > limits.max_label_key_bytes or len(prefix) > 253
        if too_long or not _LABEL_KEY.fullmatch(label_key):
            raise InvalidField(f"labels[{label_key!r}]", "key must be a Kubernetes-style label key")
        if len(label_value.encode()) > limits.max_label_value_bytes:
            raise InvalidField(
                f"labels[{label_key!r}]",
                f"value is longer than {limits.max_label_value_bytes} bytes",
            )
        if _CONTROL.search(label_value):
            raise InvalidField(
                f"labels[{label_key!r}]", "value must not contain control characters"
            )
    return dict(value)


def progress(value: bytes, limits: Limits, field_name: str = "progress") -> bytes:
    if len(value) > limits.max_progress_bytes:
        raise InvalidField(
            field_name, f"is {len(value)} bytes; at most {limits.max_progress_bytes}"
        )
    return value


def page_size(value: int, limits: Limits) -> int:
    if value < 0:
        raise InvalidField("page_size", "must not be negative")
    if value == 0:
        return limits.default_page_size
    return min(value, limits.max_page_size)


def reason(value: str, limits: Limits) -> str:
    return _bounded_text("reason", value, limits.max_reason_bytes, required=False)


def revision(value: int, field_name: str = "start_revision") -> int:
    if value < 0:
        raise InvalidField(field_name, "must not be negative")
    return value
