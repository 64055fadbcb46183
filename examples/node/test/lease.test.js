'use strict';
// Acquire, KeepAlive, LEASE_HELD and Release against a real `tether serve` (file clock).

const assert = require('node:assert/strict');
const { before, describe } = require('node:test');
const { TetherClient, TetherError, duration, grpc, micros, toTetherError } = require('../tether');
const { serverSuite, within } = require('../support/server');

const STREAM_TIMEOUT_MS = 30_000;
const TTL_US = 10_000_000n;

describe('leases', { timeout: 180_000 }, () => {
  const suite = serverSuite();
  const { test } = suite;
  let server;
  let client;
  before(() => {
    ({ server, client } = suite);
  });

  test('keep-alive over one stream extends every lease past its first deadline', async () => {
    const a = await client.acquire({ key: 'ka/a', holder: 'worker-1', ttlSeconds: 10 });
    const b = await client.acquire({ key: 'ka/b', holder: 'worker-1', ttlSeconds: 10 });
    // Not renewed: shows that the clock really moved past the first deadline.
    const idle = await client.acquire({ key: 'ka/idle', holder: 'worker-1', ttlSeconds: 10 });
    assert.equal(micros(a.expires_at), server.clock.nowUs + TTL_US);

    const stream = client.keepAlive();
    try {
      for (let round = 1; round <= 3; round += 1) {
        server.clock.advance(6); // less than the ttl since the previous renewal
        const results = await within(stream.renew([a, b]), STREAM_TIMEOUT_MS, 'keep-alive');
        assert.deepEqual(results.map((r) => r.lease_id).sort(), [a.lease_id, b.lease_id].sort());
        for (const result of results) {
          assert.equal(result.error, null, `round ${round}: ${JSON.stringify(result.error)}`);
          assert.equal(micros(result.expires_at), server.clock.nowUs + TTL_US);
          assert.deepEqual(result.ttl, { seconds: '10', nanos: 0 });
        }
      }
      // 18 s after the grant, well past the first deadline (10 s).
      for (const lease of [a, b]) {
        const now = await client.getLease(lease.lease_id);
        assert.equal(now.state, 'LEASE_STATE_ACTIVE');
        assert.equal(micros(now.expires_at), server.clock.nowUs + TTL_US);
        assert.equal(now.heartbeat_stream_attached, true);
      }
      assert.equal((await client.getLease(idle.lease_id)).state, 'LEASE_STATE_EXPIRED');
    } finally {
      stream.close();
    }
  });

  test('one refused renewal does not fail the others in the same request', async () => {
    const good = await client.acquire({ key: 'mux/good', holder: 'worker-1', ttlSeconds: 10 });
    const other = await client.acquire({ key: 'mux/other', holder: 'worker-1', ttlSeconds: 10 });
    const stale = { ...other, fencing_token: (BigInt(other.fencing_token) + 1n).toString() };
    const stream = client.keepAlive();
    try {
      server.clock.advance(1);
      const results = await within(stream.renew([good, stale]), STREAM_TIMEOUT_MS, 'keep-alive');
      const byId = new Map(results.map((r) => [r.lease_id, r]));
      assert.equal(byId.get(good.lease_id).error, null);
      assert.equal(micros(byId.get(good.lease_id).expires_at), server.clock.nowUs + TTL_US);
      const refused = byId.get(other.lease_id);
      assert.equal(refused.expires_at, null);
      assert.equal(refused.error.code, grpc.status.FAILED_PRECONDITION);
      assert.equal(refused.error.reason, 'STALE_FENCING_TOKEN');
      // The stream is still usable: an empty request is a ping and is acknowledged.
      assert.deepEqual(await within(stream.renew([]), STREAM_TIMEOUT_MS, 'ping'), []);
    } finally {
      stream.close();
    }
  });

  test("a second holder's Acquire is refused with LEASE_HELD and the holder's deadline", async () => {
    const lease = await client.acquire({ key: 'held/1', holder: 'agent-1', ttlSeconds: 30 });
    const refusal = await client
      .acquire({ key: 'held/1', holder: 'agent-2', ttlSeconds: 30 })
      .then(() => assert.fail('the second Acquire was granted'), (err) => err);

    assert.ok(refusal instanceof TetherError, refusal.stack);
    assert.equal(refusal.code, grpc.status.FAILED_PRECONDITION);
    assert.equal(refusal.reason, 'LEASE_HELD');
    assert.equal(refusal.domain, 'tether.dev');
    assert.equal(refusal.metadata.holder, 'agent-1');
    // RFC 3339 in UTC: the same instant as the lease's expires_at.
    assert.equal(Date.parse(refusal.metadata.expires_at), Number(micros(lease.expires_at) / 1000n));
    // It came from the trailer, as a serialized google.rpc.Status.
    const [raw] = refusal.cause.metadata.get('grpc-status-details-bin');
    assert.ok(Buffer.isBuffer(raw) && raw.length > 0);
  });

  test('release needs the current fencing token', async () => {
    const lease = await client.acquire({ key: 'rel/1', holder: 'agent-1', ttlSeconds: 30 });
    const wrong = { ...lease, fencing_token: (BigInt(lease.fencing_token) + 1n).toString() };
    const refusal = await client.release(wrong).then(
      () => assert.fail('a release with a wrong token was accepted'),
      (err) => err,
    );
    assert.equal(refusal.code, grpc.status.FAILED_PRECONDITION);
    assert.equal(refusal.reason, 'STALE_FENCING_TOKEN');
    assert.equal((await client.getLease(lease.lease_id)).state, 'LEASE_STATE_ACTIVE');

    const released = await client.release(lease);
    assert.equal(released.state, 'LEASE_STATE_RELEASED');
    assert.notEqual(released.ended_at, null);
    // Releasing again returns the released lease.
    assert.deepEqual(await client.release(lease), released);

    // The key is free, and its next lease has a higher token.
    const next = await client.acquire({ key: 'rel/1', holder: 'agent-2', ttlSeconds: 30 });
    assert.ok(BigInt(next.fencing_token) > BigInt(lease.fencing_token));
  });

  test('64-bit integers arrive as decimal strings', async () => {
    const lease = await client.acquire({ key: 'int64/1', holder: 'agent-1', ttlSeconds: 30 });
    const int64s = {
      fencing_token: lease.fencing_token,
      create_revision: lease.create_revision,
      mod_revision: lease.mod_revision,
      'ttl.seconds': lease.ttl.seconds,
      'expires_at.seconds': lease.expires_at.seconds,
    };
    for (const [name, value] of Object.entries(int64s)) {
      assert.equal(typeof value, 'string', name);
      assert.match(value, /^[0-9]+$/, name);
    }
    assert.equal(lease.ttl.seconds, '30');
    assert.equal(lease.expires_at.seconds, String(server.clock.nowUs / 1_000_000n + 30n));
    // Nanos is an int32 and stays a Number.
    assert.equal(typeof lease.ttl.nanos, 'number');
  });

  test("the proto3 JSON form of a Duration fails in the client, before it is sent", async () => {
    // A client of its own, not yet connected: the call fails before any stream is opened.
    // (On a connected channel grpc-js opens the stream, then cancels it; see docs/clients.md.)
    const fresh = new TetherClient(server.target);
    const err = await new Promise((resolve) => {
      fresh.leases.Acquire({ key: 'json/1', holder: 'agent-1', ttl: '30s' }, (e) => resolve(e));
    }).finally(() => fresh.close());
    assert.ok(err, 'an Acquire with ttl "30s" succeeded');
    assert.equal(err.code, grpc.status.INTERNAL);
    assert.match(err.details, /Request message serialization failure/);
    assert.match(err.details, /ttl: object expected/);
    // The server never saw it: the key has no lease.
    const missing = await client.getLease({ key: 'json/1' }).then(
      () => assert.fail('json/1 has a lease'),
      (e) => e,
    );
    assert.equal(missing.code, grpc.status.NOT_FOUND);
    assert.equal(missing.reason, 'LEASE_NOT_FOUND');
  });

  test('the server refuses a Duration finer than a microsecond', async () => {
    const refusal = await new Promise((resolve) => {
      client.leases.Acquire(
        { key: 'nanos/1', holder: 'agent-1', ttl: { seconds: '30', nanos: 1 } },
        (e) => resolve(e),
      );
    });
    assert.ok(refusal, 'a ttl of 30 s and 1 ns was accepted');
    const error = toTetherError(refusal);
    assert.equal(error.code, grpc.status.INVALID_ARGUMENT);
    assert.equal(error.reason, 'INVALID_FIELD');
    assert.equal(error.metadata.field, 'ttl');
    // duration() rounds to whole microseconds, so the client's helper never sends one.
    assert.deepEqual(duration(30.0000000001), { seconds: '30', nanos: 0 });
  });
});
