"""The registry of server processes sharing the store, so a dead process's heartbeat
streams stop being reported as attached (PostgreSQL replicas; SQLite has one process)."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import delete, func, or_, select, update

from tether_server.store.database import Database, Tx
from tether_server.store.schema import leases, replicas

STREAM_SEPARATOR = ":"


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
            result = await self._reap(
                tx,
                or_(
                    replicas.c.name == name,
                    replicas.c.heartbeat_at_us < tx.now_us - stale_after_us,
                ),
            )
            await tx.conn.execute(
                replicas.insert().values(
                    instance_id=instance_id,
                    name=name,
                    started_at_us=tx.now_us,
                    heartbeat_at_us=tx.now_us,
                )
            )
            return result

        return await self.db.run_write(work)

    async def replica_heartbeat(
        self, instance_id: str, name: str, stale_after_us: int
    ) -> ReapResult:
        """Prove this process alive, and reap the ones that stopped proving it."""

        async def work(tx: Tx) -> ReapResult:
            beat = await tx.conn.execute(
                update(replicas)
                .where(replicas.c.instance_id == instance_id)
                .values(heartbeat_at_us=tx.now_us)
            )
            if beat.rowcount == 0:
                # Reaped while it could not reach the store (its streams were detached;
                # they attach again with their next renewal): register again.
                await tx.conn.execute(
                    replicas.insert().values(
                        instance_id=instance_id,
                        name=name,
                        started_at_us=tx.now_us,
                        heartbeat_at_us=tx.now_us,
                    )
                )
            return await self._reap(
                tx,
                replicas.c.heartbeat_at_us < tx.now_us - stale_after_us,
                replicas.c.instance_id != instance_id,
            )

        return await self.db.run_write(work)

    async def replica_deregister(self, instance_id: str) -> ReapResult:
        """A clean stop: this process's streams are closed."""

        async def work(tx: Tx) -> ReapResult:
            return await self._reap(tx, replicas.c.instance_id == instance_id)

        return await self.db.run_write(work)

    async def _reap(self, tx: Tx, *conditions: object) -> ReapResult:
        dead = [
            row.instance_id
            for row in await tx.conn.execute(
                select(replicas.c.instance_id).where(*conditions)  # type: ignore[arg-type]
            )
        ]
        detached = 0
        for instance_id in dead:
            prefix = instance_id + STREAM_SEPARATOR
            result = await tx.conn.execute(
                update(leases)
                .where(func.substr(leases.c.stream_id, 1, len(prefix)) == prefix)
                .values(stream_id=None)
            )
            detached += int(result.rowcount)
        if dead:
            await tx.conn.execute(delete(replicas).where(replicas.c.instance_id.in_(dead)))
        return ReapResult(dead, detached)
