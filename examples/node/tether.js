'use strict';
// A small client for tether's LeaseService, built on @grpc/grpc-js and @grpc/proto-loader.
//
// The protos are loaded at run time from the repository's protos/ directory: there is no
// code generation step, and messages are plain objects in proto-loader's object form
// (see LOADER_OPTIONS and docs/clients.md for how that differs from the proto3 JSON form).

const path = require('node:path');
const { EventEmitter } = require('node:events');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');
const protobuf = require('protobufjs');

const PROTOS_DIR = path.resolve(__dirname, '../../protos');

// How proto-loader maps messages to JavaScript objects, in both directions:
// - keepCase: field names as written in the .proto (lease_id, fencing_token), like the
//   server's logs, the docs and grpcurl's output.
// - longs: String: 64-bit integers (fencing tokens, revisions, sequence numbers, Duration and
//   Timestamp seconds) arrive as decimal strings. A Number would silently round above 2^53.
// - enums: String: enum values arrive as their names ("LEASE_STATE_ACTIVE").
// - defaults: unset scalar fields arrive with their default value ('' / '0' / false) and unset
//   message fields as null, so `result.error === null` means "no error".
// - oneofs: a oneof also gets a virtual field naming the member that is set.
const LOADER_OPTIONS = Object.freeze({
  keepCase: true,
  longs: String,
  enums: String,
  defaults: true,
  oneofs: true,
  includeDirs: [PROTOS_DIR],
});

const DEFAULT_TIMEOUT_MS = 10_000;
const ERROR_DOMAIN = 'tether.dev';
const ENDED_EVENT_TYPES = new Set([
  'LEASE_EVENT_TYPE_RELEASED',
  'LEASE_EVENT_TYPE_EXPIRED',
  'LEASE_EVENT_TYPE_REVOKED',
]);

function loadLeaseService() {
  const definition = protoLoader.loadSync(['tether/v1/lease.proto'], LOADER_OPTIONS);
  return grpc.loadPackageDefinition(definition).tether.v1.LeaseService;
}

// The standard health service is not among tether's protos; its three messages are small
// enough to declare here.
const HEALTH_PROTO = `
syntax = "proto3";
package grpc.health.v1;
message HealthCheckRequest { string service = 1; }
message HealthCheckResponse {
  enum ServingStatus { UNKNOWN = 0; SERVING = 1; NOT_SERVING = 2; SERVICE_UNKNOWN = 3; }
  ServingStatus status = 1;
}
service Health { rpc Check(HealthCheckRequest) returns (HealthCheckResponse); }
`;

function loadHealthService() {
  const json = protobuf.parse(HEALTH_PROTO, { keepCase: true }).root.toJSON();
  return grpc.loadPackageDefinition(protoLoader.fromJSON(json, LOADER_OPTIONS)).grpc.health.v1
    .Health;
}

// google.rpc.Status and the detail messages, decoded with protobufjs (which proto-loader is
// built on) because proto-loader only describes messages and does not expose decoders.
function loadRpcTypes() {
  const root = new protobuf.Root();
  root.resolvePath = (_origin, target) => path.join(PROTOS_DIR, target);
  root.loadSync(['google/rpc/status.proto', 'google/rpc/error_details.proto'], { keepCase: true });
  return {
    Status: root.lookupType('google.rpc.Status'),
    ErrorInfo: root.lookupType('google.rpc.ErrorInfo'),
    RetryInfo: root.lookupType('google.rpc.RetryInfo'),
  };
}

const LeaseService = loadLeaseService();
const Health = loadHealthService();
const rpc = loadRpcTypes();
const DECODED = { longs: String, enums: String, defaults: true };

// --- Durations and timestamps ---------------------------------------------------------

/** A google.protobuf.Duration in object form: {seconds: '30', nanos: 0}, not "30s". */
function duration(seconds) {
  // tether keeps microseconds and refuses finer durations: round to whole microseconds.
  const micros = BigInt(Math.round(seconds * 1e6));
  return { seconds: (micros / 1_000_000n).toString(), nanos: Number(micros % 1_000_000n) * 1000 };
}

/** Microseconds since the epoch (BigInt) of a Timestamp, or the length of a Duration. */
function micros(value) {
  return BigInt(value.seconds) * 1_000_000n + BigInt(Math.trunc(value.nanos / 1000));
}

/** A Timestamp as a Date (millisecond precision: the microseconds are dropped). */
function toDate(timestamp) {
  return new Date(Number(micros(timestamp) / 1000n));
}

// --- Errors -------------------------------------------------------------------------

/** A refused call: the gRPC status plus the google.rpc.ErrorInfo the server attached. */
class TetherError extends Error {
  constructor(message, { code, reason = '', domain = '', metadata = {}, retryDelay = null, cause }) {
    super(message, { cause });
    this.name = 'TetherError';
    this.code = code; // numeric gRPC status code, compare with grpc.status.*
    this.reason = reason; // e.g. 'LEASE_HELD'; '' when the error did not come from tether
    this.domain = domain;
    this.metadata = metadata;
    this.retryDelay = retryDelay; // a Duration object from google.rpc.RetryInfo, or null
  }
}

/**
 * Reads the rich error model from a grpc-js error: the `grpc-status-details-bin` trailer
 * holds a serialized google.rpc.Status whose details are Any messages.
 */
function errorDetails(err) {
  const raw = err && err.metadata ? err.metadata.get('grpc-status-details-bin') : [];
  if (!raw.length) return null;
  const status = rpc.Status.toObject(rpc.Status.decode(raw[0]), DECODED);
  const found = { status, errorInfo: null, retryInfo: null };
  for (const any of status.details) {
    // type_url is "type.googleapis.com/google.rpc.ErrorInfo": the part after the last "/"
    // names the message.
    const type = any.type_url.slice(any.type_url.lastIndexOf('/') + 1);
    if (type === 'google.rpc.ErrorInfo') {
      found.errorInfo = rpc.ErrorInfo.toObject(rpc.ErrorInfo.decode(any.value), DECODED);
    } else if (type === 'google.rpc.RetryInfo') {
      found.retryInfo = rpc.RetryInfo.toObject(rpc.RetryInfo.decode(any.value), DECODED);
    }
  }
  return found;
}

/** A TetherError for any grpc-js call error (ErrorInfo fields empty when there is none). */
function toTetherError(err) {
  const details = errorDetails(err);
  const info = details && details.errorInfo;
  return new TetherError(err.details || err.message, {
    code: err.code,
    reason: info ? info.reason : '',
    domain: info ? info.domain : '',
    metadata: info ? info.metadata : {},
    retryDelay: details && details.retryInfo ? details.retryInfo.retry_delay : null,
    cause: err,
  });
}

// --- The client -----------------------------------------------------------------------

class TetherClient {
  /**
   * @param {string} target host:port
   * @param {object} [options]
   * @param {grpc.ChannelCredentials} [options.credentials] default: plaintext (loopback);
   *   use grpc.credentials.createSsl(caPem) for a TLS server.
   * @param {string} [options.token] bearer token, sent as `authorization: Bearer <token>`.
   * @param {string} [options.namespace] default namespace of every call ('' = "default").
   * @param {number} [options.timeoutMs] deadline of each unary call.
   */
  constructor(target, options = {}) {
    this.target = target;
    this.namespace = options.namespace || '';
    this.token = options.token || null;
    this.timeoutMs = options.timeoutMs || DEFAULT_TIMEOUT_MS;
    this.credentials = options.credentials || grpc.credentials.createInsecure();
    this.leases = new LeaseService(target, this.credentials);
  }

  close() {
    this.leases.close();
  }

  /** Resolves once the server answers SERVING to grpc.health.v1.Health/Check. */
  async waitServing({ timeoutMs = 30_000, intervalMs = 100 } = {}) {
    const deadline = Date.now() + timeoutMs;
    let last = 'no answer yet';
    for (;;) {
      // A fresh channel per attempt: a long-lived one backs off after refused connections.
      const health = new Health(this.target, this.credentials);
      try {
        const response = await new Promise((resolve, reject) => {
          health.Check({ service: '' }, this._metadata(), { deadline: Date.now() + 1000 },
            (err, res) => (err ? reject(err) : resolve(res)));
        });
        if (response.status === 'SERVING') return;
        last = response.status;
      } catch (err) {
        last = err.message;
      } finally {
        health.close();
      }
      if (Date.now() >= deadline) {
        throw new Error(`${this.target} was not SERVING after ${timeoutMs} ms (last: ${last})`);
      }
      await new Promise((resolve) => setTimeout(resolve, intervalMs));
    }
  }

  _metadata() {
    const metadata = new grpc.Metadata();
    if (this.token) metadata.set('authorization', `Bearer ${this.token}`);
    return metadata;
  }

  _unary(method, request) {
    return new Promise((resolve, reject) => {
      this.leases[method](
        { namespace: this.namespace, ...request },
        this._metadata(),
        { deadline: Date.now() + this.timeoutMs },
        (err, response) => (err ? reject(toTetherError(err)) : resolve(response)),
      );
    });
  }

  /**
   * Acquires a lease. Refused with a TetherError whose reason is LEASE_HELD (metadata
   * holder, expires_at) when someone else holds the key.
   * @returns {Promise<object>} the Lease; fencing_token and revisions are strings.
   */
  async acquire({ key, holder, ttlSeconds, waitSeconds = 0, lockDelaySeconds = 0, labels = {} }) {
    const response = await this._unary('Acquire', {
      key,
      holder,
      ttl: duration(ttlSeconds),
      wait: duration(waitSeconds),
      lock_delay: duration(lockDelaySeconds),
      labels,
    });
    return response.lease;
  }

  /** Ends the lease; needs its id, its fencing token (a string) and its holder. */
  async release(lease) {
    const response = await this._unary('Release', {
      lease_id: lease.lease_id,
      fencing_token: lease.fencing_token,
      holder: lease.holder,
    });
    return response.lease;
  }

  /** One unary renewal (KeepAliveStream renews many leases over one stream instead). */
  renew(lease) {
    return this._unary('Renew', { lease_id: lease.lease_id, fencing_token: lease.fencing_token });
  }

  /** Reads a lease by id (a string), or the latest lease of a key ({key}). */
  async getLease(selector) {
    const request = typeof selector === 'string' ? { lease_id: selector } : selector;
    return (await this._unary('GetLease', request)).lease;
  }

  /** Opens a KeepAlive stream; see KeepAliveStream. */
  keepAlive() {
    return new KeepAliveStream(this.leases.KeepAlive(this._metadata()), this.namespace);
  }

  /**
   * Streams lease events under a key prefix, from startRevision on (a string; '0' = from
   * now). Yields each LeaseEvent; stops when `signal` aborts.
   */
  async *watch({ keyPrefix = '', startRevision = '0', signal } = {}) {
    const call = this.leases.Watch(
      { namespace: this.namespace, key_prefix: keyPrefix, start_revision: startRevision },
      this._metadata(),
    );
    // Cancelling ends the call with a CANCELLED error, possibly after the loop below has
    // stopped listening: without a listener of its own that error would crash the process.
    call.on('error', () => {});
    const cancel = () => call.cancel();
    if (signal) signal.addEventListener('abort', cancel, { once: true });
    try {
      // The first response is empty: it confirms that the watch started.
      for await (const response of call) {
        for (const event of response.events) yield event;
      }
    } catch (err) {
      if (signal && signal.aborted && err.code === grpc.status.CANCELLED) return;
      throw toTetherError(err);
    } finally {
      if (signal) signal.removeEventListener('abort', cancel);
      call.cancel();
    }
  }

  /**
   * Resolves with the event that ended the lease (EXPIRED, RELEASED or REVOKED). Watching
   * from the lease's create_revision replays its history, so no event is missed however
   * late this is called (as long as the server keeps its events).
   */
  async watchEnd(lease, { signal } = {}) {
    const events = this.watch({
      keyPrefix: lease.key,
      startRevision: lease.create_revision,
      signal,
    });
    for await (const event of events) {
      // The prefix also matches longer keys, and the key's earlier and later leases.
      if (event.lease.lease_id === lease.lease_id && ENDED_EVENT_TYPES.has(event.type)) {
        return event;
      }
    }
    throw new Error(`the watch of ${lease.key} ended before lease ${lease.lease_id} did`);
  }
}

/**
 * One bidirectional KeepAlive stream for any number of leases. Each `renew` sends one
 * request carrying a renewal per lease and resolves with one result per lease, matched by
 * the request's sequence number. A result either has expires_at and ttl, or `error` (an
 * ErrorDetail: code, reason, message, metadata) for that lease alone: the stream stays open
 * for the others. `start(intervalMs)` renews every added lease periodically and emits
 * 'renewed' (results) and 'lost' (lease, error) events; 'error' when the stream fails.
 */
class KeepAliveStream extends EventEmitter {
  constructor(call, namespace) {
    super();
    this.call = call;
    this.namespace = namespace;
    this.leases = new Map();
    this.pending = new Map();
    this.sequence = 0n;
    this.failure = null;
    this.closed = false;
    this.timer = null;
    call.on('data', (response) => {
      const waiter = this.pending.get(response.sequence);
      if (waiter) {
        this.pending.delete(response.sequence);
        waiter.resolve(response.results);
      }
    });
    call.on('error', (err) => this._fail(toTetherError(err)));
    call.on('end', () => this._fail(new Error('the KeepAlive stream ended')));
  }

  add(lease) {
    this.leases.set(lease.lease_id, lease);
  }

  remove(leaseId) {
    this.leases.delete(leaseId);
  }

  /** Renews the given leases (default: every added one) in one request; [] is a ping. */
  renew(leases = [...this.leases.values()]) {
    if (this.failure) return Promise.reject(this.failure);
    if (this.closed) return Promise.reject(new Error('the KeepAlive stream is closed'));
    this.sequence += 1n;
    const sequence = this.sequence.toString();
    const answered = new Promise((resolve, reject) => {
      this.pending.set(sequence, { resolve, reject });
    });
    this.call.write({
      namespace: this.namespace,
      sequence,
      renewals: leases.map((lease) => ({
        lease_id: lease.lease_id,
        fencing_token: lease.fencing_token,
      })),
    });
    return answered;
  }

  /** Renews every added lease each intervalMs (a third of the smallest ttl is usual). */
  start(intervalMs) {
    this.stop();
    this.timer = setInterval(() => this._tick(), intervalMs);
  }

  stop() {
    if (this.timer) clearInterval(this.timer);
    this.timer = null;
  }

  async _tick() {
    let results;
    try {
      results = await this.renew();
    } catch (err) {
      this.stop();
      if (this.listenerCount('error')) this.emit('error', err);
      return;
    }
    for (const result of results) {
      if (result.error) {
        // Expired, revoked or fenced out: renewing again can never succeed.
        const lease = this.leases.get(result.lease_id);
        this.leases.delete(result.lease_id);
        this.emit('lost', lease, result.error);
      }
    }
    this.emit('renewed', results);
  }

  /** Half-closes the stream; closing never ends a lease early (its ttl is the grace). */
  close() {
    this.stop();
    if (this.closed) return;
    this.closed = true;
    if (!this.failure) this.call.end();
  }

  _fail(err) {
    if (!this.failure) this.failure = err;
    for (const waiter of this.pending.values()) waiter.reject(this.failure);
    this.pending.clear();
  }
}

module.exports = {
  ERROR_DOMAIN,
  LOADER_OPTIONS,
  PROTOS_DIR,
  KeepAliveStream,
  TetherClient,
  TetherError,
  duration,
  errorDetails,
  micros,
  toDate,
  toTetherError,
  grpc,
};
