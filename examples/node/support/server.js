'use strict';
// Starts a real `tether serve` for a test file: a free loopback port, a temporary SQLite
// database, and a file clock the test moves by rewriting the file (integer microseconds
// since the epoch, re-read by the server every 20 ms).

const fs = require('node:fs');
const net = require('node:net');
const os = require('node:os');
const path = require('node:path');
const { spawn } = require('node:child_process');
const { after, before, test } = require('node:test');
const { TetherClient } = require('../tether');

const EXAMPLE_DIR = path.resolve(__dirname, '..');
const TETHER_BIN = path.resolve(EXAMPLE_DIR, process.env.TETHER_BIN || '../../.venv/bin/tether');
const START_US = 1_700_000_000_000_000n;
// Generous: a loaded CI machine may take a while to import and migrate.
const STARTUP_TIMEOUT_MS = 60_000;

function freePort() {
  return new Promise((resolve, reject) => {
    const probe = net.createServer();
    probe.once('error', reject);
    probe.listen(0, '127.0.0.1', () => {
      const { port } = probe.address();
      probe.close(() => resolve(port));
    });
  });
}

/** The server's clock: a file the test rewrites, never backwards. */
class FileClock {
  constructor(file, startUs = START_US) {
    this.file = file;
    this.nowUs = startUs;
    this._write();
  }

  get spec() {
    return `file:${this.file}`;
  }

  advance(seconds) {
    this.nowUs += BigInt(Math.round(seconds * 1e6));
    this._write();
  }

  _write() {
    // Replace atomically so the server never reads a half-written number.
    const tmp = `${this.file}.tmp`;
    fs.writeFileSync(tmp, `${this.nowUs}\n`);
    fs.renameSync(tmp, this.file);
  }
}

class TetherServer {
  constructor() {
    this.dir = fs.mkdtempSync(path.join(os.tmpdir(), 'tether-node-'));
    this.clock = new FileClock(path.join(this.dir, 'clock'));
    this.logPath = path.join(this.dir, 'server.log');
    this.proc = null;
    this.target = null;
  }

  logTail(lines = 40) {
    try {
      return fs.readFileSync(this.logPath, 'utf8').split('\n').slice(-lines).join('\n');
    } catch {
      return '';
    }
  }

  /** Starts the server and waits until it is SERVING; on failure, leaves nothing behind. */
  async start() {
    try {
      if (!fs.existsSync(TETHER_BIN)) {
        throw new Error(`no tether binary at ${TETHER_BIN}: run \`make .venv/.installed\` in ` +
          'the repository root, or set TETHER_BIN');
      }
      // The free port may be taken between the probe and the server's bind: try a few.
      for (let attempt = 1; ; attempt += 1) {
        try {
          await this._startOnce(await freePort());
          return this;
        } catch (err) {
          await this.stop();
          if (attempt >= 3 || !/address already in use|bind|port/i.test(this.logTail())) throw err;
        }
      }
    } catch (err) {
      await this.dispose(); // the error carries the log's tail
      throw err;
    }
  }

  async _startOnce(port) {
    this.target = `127.0.0.1:${port}`;
    const env = { ...process.env, PYTHONUNBUFFERED: '1' };
    // Never inherit a developer's settings; no periodic sweep while the file clock jumps.
    for (const name of ['TETHER_LISTEN', 'TETHER_DB', 'TETHER_CLOCK']) delete env[name];
    env.TETHER_SWEEP_START_DELAY = '8760h';
    const log = fs.openSync(this.logPath, 'a');
    this.proc = spawn(TETHER_BIN, [
      'serve',
      '--listen', this.target,
      '--db', `sqlite:///${path.join(this.dir, 't.db')}`,
      '--clock', this.clock.spec,
    ], { stdio: ['ignore', log, log], env });
    fs.closeSync(log);
    this.exited = new Promise((resolve) => this.proc.once('exit', (code, signal) => {
      resolve(code === null ? signal : code);
    }));
    liveServers.add(this);

    const client = new TetherClient(this.target);
    try {
      await Promise.race([
        client.waitServing({ timeoutMs: STARTUP_TIMEOUT_MS }),
        this.exited.then((status) => {
          throw new Error(`tether serve exited (${status}) during startup:\n${this.logTail()}`);
        }),
      ]);
    } catch (err) {
      throw new Error(`${err.message}\n--- server log (${this.logPath}):\n${this.logTail()}`);
    } finally {
      client.close();
    }
  }

  /** SIGTERM, then SIGKILL if it has not exited within 20 s. */
  async stop() {
    const proc = this.proc;
    if (!proc) return;
    this.proc = null;
    liveServers.delete(this);
    if (proc.exitCode === null && proc.signalCode === null) {
      proc.kill('SIGTERM');
      const timer = setTimeout(() => proc.kill('SIGKILL'), 20_000);
      await this.exited;
      clearTimeout(timer);
    }
  }

  /** Stops the server and removes its directory (database, clock, log), printing the
   * log's tail first when `printLog` is true (a test failed). */
  async dispose({ printLog = false } = {}) {
    await this.stop();
    if (printLog) console.error(`--- tether serve log (${this.target}):\n${this.logTail(80)}`);
    fs.rmSync(this.dir, { recursive: true, force: true });
  }
}

// Last resort for a test run that ends without its after() hook: leave no server behind.
const liveServers = new Set();
process.on('exit', () => {
  for (const server of liveServers) if (server.proc) server.proc.kill('SIGKILL');
});

/** Polls `check` until it returns a truthy value; fails after timeoutMs. */
async function eventually(check, { timeoutMs = 30_000, intervalMs = 20, what = 'condition' } = {}) {
  const deadline = Date.now() + timeoutMs;
  let last;
  for (;;) {
    try {
      const value = await check();
      if (value) return value;
    } catch (err) {
      last = err;
    }
    if (Date.now() >= deadline) {
      throw new Error(`${what} not reached within ${timeoutMs} ms${last ? `: ${last.message}` : ''}`);
    }
    await new Promise((resolve) => setTimeout(resolve, intervalMs));
  }
}

/** Rejects if `promise` has not settled within timeoutMs (a hung stream fails the test). */
function within(promise, timeoutMs, what) {
  let timer;
  const timeout = new Promise((_, reject) => {
    timer = setTimeout(() => reject(new Error(`${what}: nothing within ${timeoutMs} ms`)), timeoutMs);
  });
  return Promise.race([promise, timeout]).finally(() => clearTimeout(timer));
}

/**
 * node:test's `test`, remembering whether any test failed: an after() hook then prints the
 * server's log, which a failure in CI would otherwise take away with the temporary directory.
 */
function trackedTest() {
  const tracker = { failed: false };
  tracker.test = (name, fn) => test(name, async (t) => {
    try {
      return await fn(t);
    } catch (err) {
      tracker.failed = true;
      throw err;
    }
  });
  return tracker;
}

// One real server and client for the suite it is called in: started before its tests and
// stopped after them, printing the server's log when a test failed. `server` and `client`
// are set once `before` has run.
function serverSuite() {
  const tracker = trackedTest();
  const suite = { test: tracker.test, server: null, client: null };
  before(async () => {
    suite.server = await new TetherServer().start();
    suite.client = new TetherClient(suite.server.target, { timeoutMs: 30_000 });
  });
  after(async () => {
    if (suite.client) suite.client.close();
    if (suite.server) await suite.server.dispose({ printLog: tracker.failed });
  });
  return suite;
}

module.exports = { TetherServer, FileClock, eventually, serverSuite, trackedTest, within, START_US };
