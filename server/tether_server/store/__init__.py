"""The transactional store: SQLAlchemy Core over aiosqlite or asyncpg."""

from tether_server.store.database import Database, Tx
from tether_server.store.leases import LeaseStore

__all__ = ["Database", "LeaseStore", "Tx"]
