'use strict';
// Watch and expiry against a real `tether serve`: the test moves the server's file clock past
// a lease's deadline instead of waiting for it.

const assert = require('node:assert/strict');
const { once } = require('node:events');
const { before, describe } = require('node:test');
const { grpc, micros } = require('../tether');
const { eventually, serverSuite, within } = require('../support/server');

const WAIT_MS = 30_000;

describe('watch and expiry', { timeout: 180_000 }, () => {
  const suite = serverSuite();
  const { test } = suite;
  let server;
  let client;
  before(() => {
    ({ server, client } = suite);
  });

  test('the first Watch message is empty and carries the revision as a string', async () => {
    await client.acquire({ key: 'first/1', holder: 'agent-1', ttlSeconds: 30 });
    const call = client.leases.Watch({ key_prefix: 'first/', start_revision: '0' });
    call.on('error', () => {}); // the CANCELLED error of call.cancel() below
    try {
      const [first] = await within(once(call, 'data'), WAIT_MS, 'first Watch message');
      assert.deepEqual(first.events, []);
      assert.equal(typeof first.header_revision, 'string');
      assert.ok(BigInt(first.header_revision) >= 1n);
    } finally {
      call.cancel();
    }
  });

  test('Watch reports EXPIRED once the clock passes the deadline', async () => {
    const lease = await client.acquire({ key: 'exp/1', holder: 'agent-1', ttlSeconds: 5 });
    let ended = null;
    const abort = new AbortController();
    const watching = client.watchEnd(lease, { signal: abort.signal }).then((event) => {
      ended = event;
      return event;
    });
    watching.catch(() => {}); // awaited below; aborted when the test fails first
    try {
      server.clock.advance(4); // still before the deadline
      assert.equal((await client.getLease(lease.lease_id)).state, 'LEASE_STATE_ACTIVE');
      assert.equal(ended, null, 'the lease ended before its deadline');

      server.clock.advance(2); // one second past it
      const event = await within(watching, WAIT_MS, 'EXPIRED event');
      assert.equal(event.type, 'LEASE_EVENT_TYPE_EXPIRED');
      assert.equal(event.lease.lease_id, lease.lease_id);
      assert.equal(event.lease.state, 'LEASE_STATE_EXPIRED');
      assert.equal(typeof event.revision, 'string');
      assert.ok(BigInt(event.revision) > BigInt(lease.create_revision));
      assert.ok(micros(event.lease.ended_at) >= micros(lease.expires_at));
    } finally {
      abort.abort();
    }
  });

  test('an expired lease is never renewed nor released', async () => {
    const lease = await client.acquire({ key: 'exp/2', holder: 'agent-1', ttlSeconds: 5 });
    server.clock.advance(6);
    await eventually(
      async () => (await client.getLease(lease.lease_id)).state === 'LEASE_STATE_EXPIRED',
      { what: 'lease expired' },
    );

    const stream = client.keepAlive();
    try {
      const [result] = await within(stream.renew([lease]), WAIT_MS, 'keep-alive');
      assert.equal(result.expires_at, null);
      assert.equal(result.error.code, grpc.status.FAILED_PRECONDITION);
      assert.equal(result.error.reason, 'LEASE_EXPIRED');
    } finally {
      stream.close();
    }

    const refusal = await client.release(lease).then(
      () => assert.fail('an expired lease was released'),
      (err) => err,
    );
    assert.equal(refusal.code, grpc.status.FAILED_PRECONDITION);
    assert.equal(refusal.reason, 'LEASE_EXPIRED');
    assert.equal(refusal.domain, 'tether.dev');
  });

  test('the periodic keeper renews as the clock moves and reports a lost lease', async () => {
    const lease = await client.acquire({ key: 'keeper/1', holder: 'agent-1', ttlSeconds: 10 });
    const stream = client.keepAlive();
    const lost = once(stream, 'lost');
    try {
      stream.add(lease);
      stream.start(50);
      for (let round = 1; round <= 2; round += 1) {
        server.clock.advance(6);
        // The keeper's next renewal moves the deadline to 10 s after the new time.
        await eventually(async () => {
          const now = await client.getLease(lease.lease_id);
          return micros(now.expires_at) === server.clock.nowUs + 10_000_000n;
        }, { what: `renewal after round ${round}` });
      }
      assert.equal((await client.getLease(lease.lease_id)).state, 'LEASE_STATE_ACTIVE');

      // One jump past any deadline a renewal can have given: the next one is refused.
      server.clock.advance(11);
      const [lostLease, error] = await within(lost, WAIT_MS, "'lost' event");
      assert.equal(lostLease.lease_id, lease.lease_id);
      assert.equal(error.reason, 'LEASE_EXPIRED');
      assert.equal(stream.leases.size, 0);
    } finally {
      stream.close();
    }
  });
});
