'use strict';
// Holds a lease while it works, against a running server (`make serve` in the repository):
//
//   TETHER_TARGET=127.0.0.1:50051 node example.js

const { TetherClient, TetherError, grpc, toDate } = require('./tether');

const TARGET = process.env.TETHER_TARGET || '127.0.0.1:50051';
const KEY = process.env.TETHER_KEY || 'examples/node';
const TTL_SECONDS = 15;

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

async function main() {
  const client = new TetherClient(TARGET, { token: process.env.TETHER_TOKEN });
  const abort = new AbortController();
  let stream = null;
  try {
    const lease = await client.acquire({ key: KEY, holder: 'node-example', ttlSeconds: TTL_SECONDS });
    // A uint64 arrives as a string ('1'): keep it that way, or use BigInt, never Number.
    console.log(`acquired ${lease.key}: lease ${lease.lease_id}, fencing token ${lease.fencing_token},`
      + ` expires at ${toDate(lease.expires_at).toISOString()}`);

    // Learn how the lease ends, whoever ends it.
    const ended = client.watchEnd(lease, { signal: abort.signal });
    ended.catch(() => {}); // awaited below; aborted if something fails first

    // One stream renews every lease this process holds, at a third of the ttl.
    stream = client.keepAlive();
    stream.on('lost', (lost, error) => {
      console.error(`lost lease ${lost.lease_id}: ${error.reason}; stop working`);
      process.exitCode = 1;
    });
    stream.on('error', (err) => console.error(`keep-alive stream failed: ${err.message}`));
    stream.add(lease);
    stream.start((TTL_SECONDS * 1000) / 3);

    // Someone else asking for the key is refused, and told who holds it until when.
    try {
      await client.acquire({ key: KEY, holder: 'someone-else', ttlSeconds: TTL_SECONDS });
    } catch (err) {
      if (!(err instanceof TetherError) || err.reason !== 'LEASE_HELD') throw err;
      console.log(`someone-else was refused: ${err.reason} (${err.domain}),`
        + ` held by ${err.metadata.holder} until ${err.metadata.expires_at}`);
    }

    for (let step = 1; step <= 3; step += 1) {
      // Fence every write with the token: a later holder's token is higher.
      console.log(`step ${step} with fencing token ${lease.fencing_token}`);
      await sleep(1000);
    }

    stream.close();
    const released = await client.release(lease);
    console.log(`released: ${released.state}`);
    const event = await ended;
    console.log(`watch saw ${event.type} at revision ${event.revision}`);
  } catch (err) {
    if (err instanceof TetherError && err.reason) {
      console.error(`refused: ${err.reason}: ${err.message}`, err.metadata);
    } else if (err instanceof TetherError) {
      const name = Object.keys(grpc.status).find((key) => grpc.status[key] === err.code);
      console.error(`call failed: ${name}: ${err.message}`);
    } else {
      console.error(err.message);
    }
    process.exitCode = 1;
  } finally {
    if (stream) stream.close();
    abort.abort();
    client.close();
  }
}

main();
