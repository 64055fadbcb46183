"""Alembic environment. The store hands in an open connection (see Database.migrate)."""

from alembic import context

from tether_server.store.schema import metadata

connection = context.config.attributes["connection"]
context.configure(connection=connection, target_metadata=metadata)
with context.begin_transaction():
    context.run_migrations()
