"""The transactional store: units of work over SQLite or PostgreSQL, group-committed."""

from tether_server.store.database import Database
from tether_server.store.tx import Tx

__all__ = ["Database", "Tx"]
