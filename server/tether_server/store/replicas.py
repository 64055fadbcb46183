"""The registry of server processes sharing the store, so a dead process's heartbeat
streams stop being reported as attached (PostgreSQL replicas; SQLite has one process)."""

from __future__ import annotations

from dataclasses import dataclass

from tether_server.store.database import Database
from tether_server.store.sql import Sql, sql
from tether_server.store.tx import Tx

STREAM_SEPARATOR = ":"

_INSERT = sql(
    "INSERT INTO replicas (instance_id, name, started_at_us, heartbeat_at_us)"
    " VALUES ($1, $2, $3, $3)"
)
_BEAT = sql("UPDATE replicas SET heartbeat_at_us = $2 WHERE instance_id = $1")
_DEAD_BY_NAME_OR_AGE = sql(
    "SELECT instance_id FROM replicas WHERE name = $1 OR heartbeat_at_us < $2"
)
_DEAD_BY_AGE = sql(
    "SELECT instance_id FROM replicas WHERE heartbeat_at_us < $1 AND instance_id <> $2"
)
_BY_ID = sql("SELECT instance_id FROM replicas WHERE instance_id = $1")
_DETACH = sql("UPDATE leases SET stream_id = NULL WHERE substr(stream_id, 1, $2::int) = $1")
_DELETE = sql("DELETE FROM replicas WHERE instance_id = $1")


def stream_id_for(instance_id: str, serial: str) -> str:
    return f"{instance_id}{STREAM_SEPARATOR}{serial}"


@dataclass(frozen=True)
class ReapResult:
    dead_instances: list[str]
    streams_detached: int


class ReplicaStore:
    def __init__(self, db: Database) -> None:
        self.db = db

    async def replica_register(
        self, instance_id: str, name: str, stale_after_us: int
    ) -> ReapResult:
        """Register this process. A previous process with the same replica name is dead (we
        replaced it), and so is any whose heartbeat is older than ``stale_after_us``."""

        async def work(tx: Tx) -> ReapResult:
            result = await _reap(tx, _DEAD_BY_NAME_OR_AGE, name, tx.now_us - stale_after_us)
            await tx.execute(_INSERT, instance_id, name, tx.now_us)
            return result

        return await self.db.write(work, emits=False)

    async def replica_heartbeat(self, instance_id: str, name: str) -> None:
        """Prove this process alive."""

        async def work(tx: Tx) -> None:
            if await tx.execute(_BEAT, instance_id, tx.now_us) == 0:
                # Reaped while it could not reach the store (its streams were detached;
                # they attach again with their next renewal): register again.
                await tx.execute(_INSERT, instance_id, name, tx.now_us)

        await self.db.write(work, emits=False)

    async def replica_reap(self, instance_id: str, stale_after_us: int) -> ReapResult:
        """Reap the processes that stopped proving themselves alive (leader-only)."""

        async def work(tx: Tx) -> ReapResult:
            return await _reap(tx, _DEAD_BY_AGE, tx.now_us - stale_after_us, instance_id)

        return await self.db.write(work, emits=False)

    async def replica_deregister(self, instance_id: str) -> ReapResult:
        """A clean stop: this process's streams are closed."""
        return await self.db.write(lambda tx: _reap(tx, _BY_ID, instance_id), emits=False)


async def _reap(tx: Tx, dead_query: Sql, *args: object) -> ReapResult:
    dead = [row["instance_id"] for row in await tx.fetch(dead_query, *args)]
    detached = 0
    for instance_id in dead:
        prefix = instance_id + STREAM_SEPARATOR
        detached += await tx.execute(_DETACH, prefix, len(prefix))
        await tx.execute(_DELETE, instance_id)
    return ReapResult(dead, detached)
