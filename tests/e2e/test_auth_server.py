"""The security settings of a real `tether serve` process: anonymous serving only on
loopback, and the tokens file re-read on SIGHUP without dropping streams."""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path

import grpc
import pytest

from tests.service.conftest import WAIT_S, dur, error_info
from tests.support.certs import TestPki, TlsServerProcess, channel_credentials, server_tls_args
from tests.support.server_process import ServerProcess, ServerStartError
from tether_client.pb import lease_pb2, lease_pb2_grpc

pytestmark = pytest.mark.e2e

OLD = "old-token-000000000000000001"
NEW = "new-token-000000000000000002"


def test_anonymous_serving_on_a_reachable_address_is_refused(db_url: str, tmp_path: Path) -> None:
    """On 0.0.0.0 with no credentials configured the server refuses to start and says
    why; --insecure-allow-anonymous starts it."""
    refused = ServerProcess(db_url, log_dir=tmp_path, startup_timeout=60)
    refused.extra_args = ["--listen", f"0.0.0.0:{refused.port}"]
    with pytest.raises(ServerStartError):
        refused.start()
    assert refused.returncode == 1
    assert "refusing to serve anonymous callers" in refused.log_text()

    allowed = ServerProcess(db_url, log_dir=tmp_path, startup_timeout=60)
    allowed.extra_args = ["--listen", f"0.0.0.0:{allowed.port}", "--insecure-allow-anonymous"]
    with allowed:
        assert "--insecure-allow-anonymous" in allowed.log_text()


async def test_sighup_rereads_the_tokens_file_and_open_streams_go_on(
    db_url: str, test_pki: TestPki, tmp_path: Path
) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text(f"token:{OLD} worker-a worker default\n")
    credentials = channel_credentials(test_pki)
    server = TlsServerProcess(
        db_url,
        health_credentials=credentials,
        extra_args=[*server_tls_args(test_pki), "--auth-tokens", str(tokens)],
        log_dir=tmp_path,
    )
    with server:
        async with grpc.aio.secure_channel(server.target, credentials) as channel:
            stub = lease_pb2_grpc.LeaseServiceStub(channel)
            old = (("authorization", f"Bearer {OLD}"),)
            new = (("authorization", f"Bearer {NEW}"),)
            lease = (
                await stub.Acquire(
                    lease_pb2.AcquireRequest(key="k", holder="h", ttl=dur(60)),
                    metadata=old,
                    timeout=WAIT_S,
                )
            ).lease
            renewal = lease_pb2.KeepAliveRequest(
                sequence=1,
                renewals=[
                    lease_pb2.KeepAliveRenewal(
                        lease_id=lease.lease_id, fencing_token=lease.fencing_token
                    )
                ],
            )
            stream = stub.KeepAlive(metadata=old, timeout=60)
            await stream.write(renewal)
            assert not (await stream.read()).results[0].HasField("error")

            await asyncio.to_thread(tokens.write_text, f"token:{NEW} worker-a worker default\n")
            assert server.pid is not None
            reloads = server.log_text().count("tokens file reloaded")
            os.kill(server.pid, signal.SIGHUP)
            # Wait for the reload to happen (the server logs it), not for time to pass.
            for _ in range(600):
                if server.log_text().count("tokens file reloaded") > reloads:
                    break
                await asyncio.sleep(0.05)
            else:
                raise AssertionError(f"no reload logged:\n{server.log_tail()}")

            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await stub.GetLease(
                    lease_pb2.GetLeaseRequest(lease_id=lease.lease_id), metadata=old, timeout=WAIT_S
                )
            assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert error_info(caught.value)[1] == "INVALID_CREDENTIALS"
            got = await stub.GetLease(
                lease_pb2.GetLeaseRequest(lease_id=lease.lease_id), metadata=new, timeout=WAIT_S
            )
            assert got.lease.state == lease_pb2.LEASE_STATE_ACTIVE
            # The stream opened with the old token was not dropped.
            await stream.write(renewal)
            assert not (await stream.read()).results[0].HasField("error")
            stream.cancel()
