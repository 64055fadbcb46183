"""Background work of the server: one Runner for every periodic task, and who leads."""

from tether_server.runtime.leader import AlwaysLeader, Leadership, PgAdvisoryLeader
from tether_server.runtime.runner import Runner, TaskSpec

__all__ = ["AlwaysLeader", "Leadership", "PgAdvisoryLeader", "Runner", "TaskSpec"]
