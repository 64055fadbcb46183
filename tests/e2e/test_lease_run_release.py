"""``tether lease run`` when the release at the end finds the lease already ended.

The command revokes its own lease and exits at once: the keeper renews only at a third of
the ttl, so it never hears of the revocation while the command runs, and only the release
learns it. The run must not pass the command's status on as if the lease had covered it.
"""

from __future__ import annotations

import shlex
import sys

import pytest

from tests.e2e import ServerFactory
from tests.e2e.cli_support import Cli

pytestmark = pytest.mark.e2e

EXIT_LEASE_LOST = 75
LEASE = Cli("lease")


def test_run_reports_a_lease_revoked_while_the_command_ran(
    db_url: str, server_factory: ServerFactory
) -> None:
    target = server_factory(db_url).target
    revoke_own_lease = shlex.join(
        [sys.executable, "-m", "tether_client.cli", "lease", "--target", target, "revoke"]
    )
    script = f'{revoke_own_lease} "$TETHER_LEASE_ID" >/dev/null && exit 0'
    # A long ttl: the first renewal is due 20 s in, long after the command is done.
    result = LEASE(target, "run", "jobs/1", "--ttl", "60s", "--", "sh", "-c", script)
    assert result.returncode == EXIT_LEASE_LOST, result.stderr
    assert "lease lost while the command ran (it exited 0)" in result.stderr
    assert "LEASE_REVOKED" in result.stderr
    lease = LEASE.ok_json(target, "get", "jobs/1")
    assert lease["state"] == "LEASE_STATE_REVOKED"
