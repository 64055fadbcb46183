"""Table definitions, in step with the Alembic migrations (a test compares them). Queries
are plain SQL (store/sql.py); this module documents the schema and checks the migrations.

Times are BIGINT microseconds since the epoch (UTC) so SQLite and PostgreSQL compare and
order them identically.
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Column,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    text,
)

metadata = MetaData()

_ENDED = text("ended_at_us IS NOT NULL")
_ACTIVE = text("state = 'ACTIVE'")

# One row per key ever leased. Keeps the fencing-token counter so tokens never repeat, even
# after every lease row of the key is purged, and the key's lock-delay.
lease_keys = Table(
    "lease_keys",
    metadata,
    Column("namespace", String(63), primary_key=True),
    Column("key", String(512), primary_key=True),
    Column("last_fencing_token", BigInteger, nullable=False),
    Column("available_at_us", BigInteger, nullable=False),
    Column("current_lease_id", String(64), nullable=True),
)

leases = Table(
    "leases",
    metadata,
    Column("lease_id", String(64), primary_key=True),
    Column("namespace", String(63), nullable=False),
    Column("key", String(512), nullable=False),
    Column("holder", String(256), nullable=False),
    Column("principal", String(256), nullable=False),
    Column("ttl_us", BigInteger, nullable=False),
    Column("fencing_token", BigInteger, nullable=False),
    Column("state", String(16), nullable=False),
    Column("acquired_at_us", BigInteger, nullable=False),
    Column("renewed_at_us", BigInteger, nullable=False),
    Column("expires_at_us", BigInteger, nullable=False),
    Column("ended_at_us", BigInteger, nullable=True),
    Column("lock_delay_us", BigInteger, nullable=False),
    Column("labels", Text, nullable=False),
    Column("progress", LargeBinary, nullable=False),
    # The KeepAlive stream that last renewed the lease, while that stream is open.
    Column("stream_id", String(64), nullable=True),
    Column("request_id", String(128), nullable=True),
    Column("create_revision", BigInteger, nullable=False),
    Column("mod_revision", BigInteger, nullable=False),
    UniqueConstraint("namespace", "key", "fencing_token", name="uq_leases_key_token"),
    Index("ix_leases_state_expires", "state", "expires_at_us"),
    Index("ix_leases_holder", "namespace", "holder"),
    Index("ix_leases_stream", "stream_id"),
    # Partial: what the retention purge walks; live leases never enter it.
    Index("ix_leases_ended", "ended_at_us", postgresql_where=_ENDED, sqlite_where=_ENDED),
    # Partial: a principal's active leases, counted against its cap by every Acquire.
    Index(
        "ix_leases_principal_active",
        "principal",
        "expires_at_us",
        postgresql_where=_ACTIVE,
        sqlite_where=_ACTIVE,
    ),
)

# Acquire's idempotency record: the first result of each client request id, and a digest
# of the request so a reuse with other content is refused instead of answered wrongly.
lease_requests = Table(
    "lease_requests",
    metadata,
    Column("namespace", String(63), primary_key=True),
    Column("request_id", String(128), primary_key=True),
    Column("lease_id", String(64), nullable=False),
    Column("fingerprint", String(64), nullable=False),
    Column("created_at_us", BigInteger, nullable=False),
)

# The one event log of every area (see store/events.py). Revisions are allocated under the
# `revisions` row lock, so they commit in order: a watcher that has seen revision N never
# later finds a smaller one appear.
events = Table(
    "events",
    metadata,
    Column("revision", BigInteger, primary_key=True, autoincrement=False),
    Column("area", String(16), nullable=False),
    Column("namespace", String(63), nullable=False),
    Column("key", String(512), nullable=False),
    Column("object_id", String(256), nullable=False),
    Column("type", String(16), nullable=False),
    Column("occurred_at_us", BigInteger, nullable=False),
    Column("snapshot", Text, nullable=False),
    Index("ix_events_area_ns_rev", "area", "namespace", "revision"),
)

# Single row (id = 1): the latest revision handed out, the highest one purged, and the
# fencing-token floor: the highest token of any purged lease key. A key leased again after
# its row was purged starts above it, so its tokens still only grow.
revisions = Table(
    "revisions",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=False),
    Column("current", BigInteger, nullable=False),
    Column("compacted", BigInteger, nullable=False),
    Column("token_floor", BigInteger, nullable=False, server_default="0"),
)

# Server processes sharing the store. A KeepAlive stream is attached to leases under an id
# that starts with its process's instance id, so the streams of a process that died can be
# detached by whoever notices it is gone (a restart of the same replica, or a stale heartbeat).
replicas = Table(
    "replicas",
    metadata,
    Column("instance_id", String(64), primary_key=True),
    Column("name", String(256), nullable=False),
    Column("started_at_us", BigInteger, nullable=False),
    Column("heartbeat_at_us", BigInteger, nullable=False),
    Index("ix_replicas_name", "name"),
)


# Sagas (see domain/saga.py). The claim's fence (lease id and token) stays after the claim
# ends (claim_active = 0) so a retried CompleteSaga or FailSaga is recognised.
sagas = Table(
    "sagas",
    metadata,
    Column("namespace", String(63), primary_key=True),
    Column("saga_id", String(256), primary_key=True),
    Column("kind", String(128), nullable=False),
    Column("state", String(16), nullable=False),
    Column("labels", Text, nullable=False),
    Column("input", Text, nullable=False),
    Column("owner", Text, nullable=True),
    Column("on_stale", String(16), nullable=False),
    Column("max_attempts", Integer, nullable=False),
    Column("attempt", Integer, nullable=False),
    Column("attempt_base", Integer, nullable=False),
    Column("claim_lease_id", String(64), nullable=True),
    Column("claim_token", BigInteger, nullable=True),
    Column("claim_purpose", String(16), nullable=True),
    Column("claim_holder", String(256), nullable=True),
    Column("claim_principal", String(256), nullable=True),
    Column("claim_active", Integer, nullable=False),
    # 1 when the claim created its lease (ClaimSaga new_lease): ending the claim releases it.
    Column("claim_owns_lease", Integer, nullable=False),
    Column("progress", LargeBinary, nullable=False),
    Column("output", Text, nullable=True),
    Column("failure_reason", Text, nullable=False),
    Column("not_before_us", BigInteger, nullable=False),
    Column("deadline_us", BigInteger, nullable=True),
    Column("created_at_us", BigInteger, nullable=False),
    Column("updated_at_us", BigInteger, nullable=False),
    Column("ended_at_us", BigInteger, nullable=True),
    Column("create_revision", BigInteger, nullable=False),
    Column("mod_revision", BigInteger, nullable=False),
    Column("fingerprint", String(64), nullable=False),
    Index("ix_sagas_queue", "namespace", "kind", "state", "created_at_us"),
    Index("ix_sagas_deadline", "state", "deadline_us"),
    Index("ix_sagas_claim", "claim_lease_id"),
    Index("ix_sagas_ended", "ended_at_us", postgresql_where=_ENDED, sqlite_where=_ENDED),
)

# The step log: one row per step index; a step run again in a later attempt is updated.
saga_steps = Table(
    "saga_steps",
    metadata,
    Column("namespace", String(63), primary_key=True),
    Column("saga_id", String(256), primary_key=True),
    Column("step_index", Integer, primary_key=True, autoincrement=False),
    Column("name", String(256), nullable=False),
    Column("status", String(16), nullable=False),
    Column("attempt", Integer, nullable=False),
    Column("output", Text, nullable=True),
    Column("error", Text, nullable=False),
    Column("compensation", Text, nullable=True),
    Column("started_at_us", BigInteger, nullable=True),
    Column("finished_at_us", BigInteger, nullable=True),
)

# One record per compensation to run, written when the saga starts compensating and kept
# for good (a failed saga keeps every compensation record).
saga_compensations = Table(
    "saga_compensations",
    metadata,
    Column("namespace", String(63), primary_key=True),
    Column("saga_id", String(256), primary_key=True),
    Column("step_index", Integer, primary_key=True, autoincrement=False),
    Column("name", String(256), nullable=False),
    Column("status", String(16), nullable=False),
    Column("attempts", Integer, nullable=False),
    Column("max_attempts", Integer, nullable=False),
    Column("payload", Text, nullable=True),
    Column("error", Text, nullable=False),
    Column("updated_at_us", BigInteger, nullable=False),
    Column("marked_by", String(256), nullable=False),
)

# Audit entries, on any saga, terminal ones included.
saga_annotations = Table(
    "saga_annotations",
    metadata,
    Column("namespace", String(63), primary_key=True),
    Column("saga_id", String(256), primary_key=True),
    Column("seq", Integer, primary_key=True, autoincrement=False),
    Column("created_at_us", BigInteger, nullable=False),
    Column("author", String(256), nullable=False),
    Column("text", Text, nullable=False),
    Column("attributes", Text, nullable=False),
)


# Objects (see domain/objects.py). A terminating object keeps its name taken until it is
# gone. ``owner_refs`` is the object's own list (read with it); ``object_owners`` indexes the
# same references from the owner's side, which is how the collector finds dependents.
objects = Table(
    "objects",
    metadata,
    Column("uid", String(64), primary_key=True),
    Column("namespace", String(63), nullable=False),
    Column("kind", String(63), nullable=False),
    Column("name", String(253), nullable=False),
    Column("labels", Text, nullable=False),
    Column("annotations", Text, nullable=False),
    Column("spec", Text, nullable=False),
    Column("status", Text, nullable=False),
    Column("owner_refs", Text, nullable=False),
    Column("finalizers", Text, nullable=False),
    Column("refusals", Text, nullable=False),
    Column("history", Text, nullable=False),
    Column("deletion_ts_us", BigInteger, nullable=True),
    Column("created_at_us", BigInteger, nullable=False),
    Column("create_revision", BigInteger, nullable=False),
    Column("mod_revision", BigInteger, nullable=False),
    Column("request_id", String(128), nullable=True),
    Column("fingerprint", String(64), nullable=False),
    UniqueConstraint("namespace", "kind", "name", name="uq_objects_name"),
    Index("ix_objects_terminating", "namespace", "deletion_ts_us"),
)

object_owners = Table(
    "object_owners",
    metadata,
    Column("dependent_uid", String(64), primary_key=True),
    # An object's uid, a lease id or a saga id.
    Column("owner_uid", String(256), primary_key=True),
    Column("namespace", String(63), nullable=False),
    Column("owner_kind", String(63), nullable=False),
    Column("block_owner_deletion", Integer, nullable=False),
    Index("ix_object_owners_owner", "owner_uid", "dependent_uid"),
)

# Owners whose dependents the collector must look at (gone, waiting in the foreground,
# orphaning). A failed pass stays queued with its error and a later next attempt.
gc_queue = Table(
    "gc_queue",
    metadata,
    Column("namespace", String(63), primary_key=True),
    Column("uid", String(256), primary_key=True),
    Column("enqueued_at_us", BigInteger, nullable=False),
    Column("next_attempt_us", BigInteger, nullable=False),
    Column("attempts", Integer, nullable=False),
    Column("last_error", Text, nullable=False),
    Index("ix_gc_queue_next", "next_attempt_us"),
)


# One row per sweep; the report itself is JSON (read whole, never queried by field).
sweep_reports = Table(
    "sweep_reports",
    metadata,
    Column("sweep_id", String(64), primary_key=True),
    Column("started_at_us", BigInteger, nullable=False),
    Column("trigger", String(16), nullable=False),
    Column("dry_run", Integer, nullable=False),
    Column("replica", String(256), nullable=False),
    Column("body", Text, nullable=False),
    Index("ix_sweep_reports_started", "started_at_us", "sweep_id"),
)
