// Loopback OAuth 2.0 server for vaultconn's tests: a real `oidc-provider` (panva, pinned in
// package.json) plus a few test-only endpoints. Never expose this beyond 127.0.0.1.
//
// Run:   node server.mjs [--port N] [--rotate true|false] [--at-ttl SECS] [--rt-ttl SECS]
// Env:   PORT (0 = random, default 0), ROTATE (true|false, default true), AT_TTL (seconds, default
//        60; used for AccessToken, ClientCredentials and resource-server tokens), RT_TTL (seconds,
//        default 86400), EXIT_ON_STDIN_EOF (1 = exit when stdin closes, i.e. when the parent
//        process is gone; the Rust harness sets it and keeps stdin open).
// Argv wins over env. Once listening, the first and only stdout line is `{"port":12345}`. Every
// log line goes to stderr.
//
// Issuer: http://127.0.0.1:<port>. Endpoints (also in /.well-known/openid-configuration):
//   POST /token                token endpoint (client_credentials, refresh_token, authorization_code)
//   POST /token/introspection  RFC 7662 introspection; any client below may introspect its own tokens
//   POST /token/revocation     RFC 7009 revocation
//
// Clients (secrets are fixed, test-only):
//   client_id        secret             auth method          grant types
//   m2m              m2m-secret         client_secret_basic  client_credentials
//   m2m-post         m2m-post-secret    client_secret_post   client_credentials
//   m2m special/1    s3cr:et+%&         client_secret_basic  client_credentials
//                    (RFC 6749 App. B: id and secret must each be form-urlencoded before base64;
//                    raw credentials fail with 400 invalid_request because `%&` does not decode)
//   rt-client        rt-client-secret   client_secret_basic  authorization_code, refresh_token
//
// client_credentials and resource indicators (RFC 8707): any absolute URI is accepted as
// `resource`; the token is then a JWT access token with `aud` = that URI, scope filtered to
// `api:read api:write`, lifetime AT_TTL. Auth0-style `audience=<absolute URI>` is accepted as an
// alias: when a /token request has `audience` and no `resource`, the harness rewrites it to
// `resource` before oidc-provider sees it (oidc-provider itself would silently drop `audience`). A
// non-URI audience is dropped as an unknown parameter (RFC 6749 §3.2) and an opaque token without
// audience is issued. Without audience/resource the token is opaque, lifetime AT_TTL. The mapping
// applies to client_credentials only: on the refresh grant `audience` is ignored (a `resource` there
// must be one the refresh token was granted for, else 400 invalid_target; minted ones have none).
//
// Refresh tokens: rotation per ROTATE (`rotateRefreshToken`). With rotation on, replaying a spent
// refresh token gives 400 invalid_grant ("refresh token already used") and revokes the whole grant
// (event `grant.revoked`), as RFC 9700 §4.14.2 describes.
//
// Test-only endpoints (loopback callers only, no auth):
//   POST /__mint_rt       -> {"refresh_token": "...", "grant_id": "..."}: creates a Grant (account
//                            `test-user`, scope `openid offline_access`) and a RefreshToken for
//                            `rt-client` directly through the provider's models; no browser login.
//                            Counts as one `refresh_token.saved` event.
//   GET  /__events        -> counters, the token requests, error events, minted seeds and
//                            `grant.revoked` events. Never token values: tokens appear only as
//                            fingerprints (first 16 hex digits of their SHA-256, as the Rust
//                            harness computes), so the provider-side invariants (no replay, no
//                            unexplained revocation) can be checked from the provider's own
//                            record. Each token request record: seq, at / done_at (ms since the
//                            epoch), grant_type, client_id (form), presented_client_id (Basic or
//                            form), auth, scope, audience, resource, status, error, fault,
//                            refresh_token_fp (presented), issued_refresh_token_fp (committed,
//                            even if a fault kept it from the client), grant_id, revoked_grant_id
//                            (this request made the provider revoke that grant).
//   POST /__events/reset  -> zeroes the counters and empties the lists
//   POST /__fault         -> {"mode": "...", "times": N, ...}: arms a fault for the next N /token
//                            requests (default 1). Modes:
//                              strip_refresh_token  200 with `refresh_token` removed (after commit)
//                              strip_expires_in     200 with `expires_in` removed
//                              expires_in_string    200 with `expires_in` as a JSON string
//                              garbage_200          200 with truncated JSON (after commit)
//                              drop_before          socket destroyed before the request is handled
//                              drop_after_commit    request handled (tokens rotated), then socket
//                                                   destroyed without a response
//                              slow_after_commit    request handled, response delayed `delay_ms`
//                              status               reply `status` (e.g. 429, 503) with optional
//                                                   `retry_after` header value, JSON error body,
//                                                   request not handled
//                              html500              500 with an HTML body, request not handled
//   GET  /__fault         -> {"armed": [...]}; DELETE /__fault clears all armed faults
//
// Quirks handled here: the provider's default in-memory adapter is an LRU capped at 1,000 entries,
// which silently evicts live refresh tokens in scale tests; this file uses an unbounded Map with
// expiry instead.

import { createHash, generateKeyPairSync } from 'node:crypto';
import * as http from 'node:http';
import { parseArgs } from 'node:util';

import Provider from 'oidc-provider';

const { values: argv } = parseArgs({
  options: {
    port: { type: 'string' },
    rotate: { type: 'string' },
    'at-ttl': { type: 'string' },
    'rt-ttl': { type: 'string' },
  },
  strict: true,
});

function positiveInt(name, raw, fallback, { allowZero = false } = {}) {
  if (raw === undefined || raw === '') return fallback;
  const n = Number(raw);
  if (!Number.isInteger(n) || n < 0 || (!allowZero && n === 0)) {
    throw new Error(`${name} must be a ${allowZero ? 'non-negative' : 'positive'} integer, got ${raw}`);
  }
  return n;
}

function bool(name, raw, fallback) {
  if (raw === undefined || raw === '') return fallback;
  if (raw === 'true' || raw === '1') return true;
  if (raw === 'false' || raw === '0') return false;
  throw new Error(`${name} must be true or false, got ${raw}`);
}

const PORT = positiveInt('port', argv.port ?? process.env.PORT, 0, { allowZero: true });
const ROTATE = bool('rotate', argv.rotate ?? process.env.ROTATE, true);
const AT_TTL = positiveInt('at-ttl', argv['at-ttl'] ?? process.env.AT_TTL, 60);
const RT_TTL = positiveInt('rt-ttl', argv['rt-ttl'] ?? process.env.RT_TTL, 24 * 60 * 60);
const TEST_ACCOUNT = 'test-user';
const RT_SCOPE = 'openid offline_access';

const log = (...args) => console.error('[oidc]', ...args);

if (process.env.EXIT_ON_STDIN_EOF === '1') {
  process.stdin.on('end', () => process.exit(0));
  process.stdin.on('error', () => process.exit(0));
  process.stdin.resume();
}

// ---------------------------------------------------------------------------------------------
// Storage: unbounded Map with expiry (the provider's default LRU evicts after 1,000 entries).
const store = new Map(); // key -> { payload, expiresAt (ms epoch or Infinity) }
const grantMembers = new Map(); // grantId -> Set of keys

function liveEntry(key) {
  const entry = store.get(key);
  if (!entry) return undefined;
  if (entry.expiresAt <= Date.now()) {
    store.delete(key);
    return undefined;
  }
  return entry;
}

class MapAdapter {
  constructor(model) {
    this.model = model;
  }

  key(id) {
    return `${this.model}:${id}`;
  }

  async upsert(id, payload, expiresIn) {
    const key = this.key(id);
    const expiresAt = typeof expiresIn === 'number' ? Date.now() + expiresIn * 1000 : Infinity;
    store.set(key, { payload, expiresAt });
    if (payload.grantId) {
      let members = grantMembers.get(payload.grantId);
      if (!members) {
        members = new Set();
        grantMembers.set(payload.grantId, members);
      }
      members.add(key);
    }
    if (payload.uid) store.set(`sessionUid:${payload.uid}`, { payload: id, expiresAt });
    if (payload.userCode) store.set(`userCode:${payload.userCode}`, { payload: id, expiresAt });
  }

  async find(id) {
    return liveEntry(this.key(id))?.payload;
  }

  async findByUid(uid) {
    const id = liveEntry(`sessionUid:${uid}`)?.payload;
    return id === undefined ? undefined : this.find(id);
  }

  async findByUserCode(userCode) {
    const id = liveEntry(`userCode:${userCode}`)?.payload;
    return id === undefined ? undefined : this.find(id);
  }

  async consume(id) {
    const entry = liveEntry(this.key(id));
    if (entry) entry.payload.consumed = Math.floor(Date.now() / 1000);
  }

  async destroy(id) {
    store.delete(this.key(id));
  }

  async revokeByGrantId(grantId) {
    const members = grantMembers.get(grantId);
    if (!members) return;
    for (const key of members) store.delete(key);
    grantMembers.delete(grantId);
  }
}

setInterval(() => {
  const now = Date.now();
  for (const [key, entry] of store) {
    if (entry.expiresAt <= now) store.delete(key);
  }
  for (const [grantId, members] of grantMembers) {
    for (const key of members) if (!store.has(key)) members.delete(key);
    if (members.size === 0) grantMembers.delete(grantId);
  }
}, 30_000).unref();

// ---------------------------------------------------------------------------------------------
// Events the tests assert on. Never record token values.
const COUNTED = [
  'grant.success',
  'grant.error',
  'grant.revoked',
  'refresh_token.saved',
  'refresh_token.consumed',
  'refresh_token.destroyed',
  'access_token.saved',
  'access_token.issued',
  'client_credentials.saved',
  'client_credentials.issued',
  'revocation.error',
  'introspection.error',
  'server_error',
];
const counts = {};
const errors = []; // { event, error, error_description, grant_type, client_id }
let tokenRequests = 0;
const requests = []; // see the header: /__events
let requestsDropped = 0; // records shifted out of `requests` (the invariants need them all)
const mints = []; // { refresh_token_fp, grant_id, at }
const revocations = []; // { grant_id, route, at, request_seq }
const recordOf = new WeakMap(); // Koa ctx -> its token request record
const REQUESTS_KEPT = 10_000;

function resetEvents() {
  for (const name of COUNTED) counts[name] = 0;
  errors.length = 0;
  requests.length = 0;
  requestsDropped = 0;
  mints.length = 0;
  revocations.length = 0;
  tokenRequests = 0;
}
resetEvents();

// A token's identity in the event log: never its value.
function fingerprint(value) {
  if (typeof value !== 'string' || value === '') return undefined;
  return createHash('sha256').update(value).digest('hex').slice(0, 16);
}

// The client id of `Authorization: Basic` (RFC 6749 §2.3.1: form-urlencoded, then base64).
function basicClientId(header) {
  const [scheme, value] = (header ?? '').trim().split(/\s+/, 2);
  if (scheme?.toLowerCase() !== 'basic' || !value) return undefined;
  const raw = Buffer.from(value, 'base64').toString('utf8');
  const colon = raw.indexOf(':');
  if (colon < 0) return undefined;
  const id = raw.slice(0, colon).replace(/\+/g, ' ');
  try {
    return decodeURIComponent(id);
  } catch {
    return id;
  }
}

function recordError(event, ctx, err) {
  errors.push({
    event,
    error: err?.error ?? err?.name ?? 'unknown',
    error_description: err?.error_description,
    error_detail: err?.error_detail,
    grant_type: ctx?.oidc?.params?.grant_type,
    client_id: ctx?.oidc?.client?.clientId,
  });
  if (errors.length > 1000) errors.shift();
}

// ---------------------------------------------------------------------------------------------
// Faults armed through /__fault, consumed one per /token request.
const faults = []; // { mode, remaining, status, retry_after, delay_ms }
const FAULT_MODES = new Set([
  'strip_refresh_token',
  'strip_expires_in',
  'expires_in_string',
  'garbage_200',
  'drop_before',
  'drop_after_commit',
  'slow_after_commit',
  'status',
  'html500',
]);

function takeFault() {
  const fault = faults[0];
  if (!fault) return undefined;
  fault.remaining -= 1;
  if (fault.remaining <= 0) faults.shift();
  return fault;
}

// ---------------------------------------------------------------------------------------------
const { privateKey } = generateKeyPairSync('rsa', { modulusLength: 2048 });
const signingKey = { ...privateKey.export({ format: 'jwk' }), kid: 'test-rs256', alg: 'RS256', use: 'sig' };

function isAbsoluteUri(value) {
  return typeof value === 'string' && URL.canParse(value) && !value.includes('#');
}

function buildProvider(issuer) {
  const provider = new Provider(issuer, {
    adapter: MapAdapter,
    jwks: { keys: [signingKey] },
    clients: [
      {
        client_id: 'm2m',
        client_secret: 'm2m-secret',
        token_endpoint_auth_method: 'client_secret_basic',
        grant_types: ['client_credentials'],
        response_types: [],
        redirect_uris: [],
      },
      {
        client_id: 'm2m-post',
        client_secret: 'm2m-post-secret',
        token_endpoint_auth_method: 'client_secret_post',
        grant_types: ['client_credentials'],
        response_types: [],
        redirect_uris: [],
      },
      {
        client_id: 'm2m special/1',
        client_secret: 's3cr:et+%&',
        token_endpoint_auth_method: 'client_secret_basic',
        grant_types: ['client_credentials'],
        response_types: [],
        redirect_uris: [],
      },
      {
        client_id: 'rt-client',
        client_secret: 'rt-client-secret',
        token_endpoint_auth_method: 'client_secret_basic',
        grant_types: ['authorization_code', 'refresh_token'],
        response_types: ['code'],
        redirect_uris: ['http://127.0.0.1/callback'],
      },
    ],
    scopes: ['openid', 'offline_access', 'api:read', 'api:write'],
    async findAccount(ctx, sub) {
      return { accountId: sub, async claims() { return { sub }; } };
    },
    features: {
      devInteractions: { enabled: false },
      clientCredentials: { enabled: true },
      introspection: { enabled: true },
      revocation: { enabled: true },
      resourceIndicators: {
        enabled: true,
        defaultResource: () => undefined,
        useGrantedResource: () => true,
        getResourceServerInfo: (ctx, resourceIndicator) => ({
          scope: 'api:read api:write',
          audience: resourceIndicator,
          accessTokenTTL: AT_TTL,
          accessTokenFormat: 'jwt',
          jwt: { sign: { alg: 'RS256' } },
        }),
      },
    },
    rotateRefreshToken: ROTATE,
    ttl: {
      AccessToken: AT_TTL,
      ClientCredentials: AT_TTL,
      RefreshToken: RT_TTL,
      Grant: RT_TTL,
      IdToken: 3600,
      AuthorizationCode: 60,
      Interaction: 600,
      Session: 3600,
    },
  });

  for (const name of COUNTED) {
    provider.on(name, (...args) => {
      counts[name] += 1;
      if (name === 'grant.error' || name === 'server_error' || name === 'revocation.error'
        || name === 'introspection.error') {
        const [ctx, err] = args;
        recordError(name, ctx, err);
        if (name === 'server_error') log('server_error', err?.stack ?? err);
      }
      if (name === 'grant.revoked') {
        const [ctx, grantId] = args;
        log(`grant.revoked grant_id=${grantId} route=${ctx?.oidc?.route ?? '-'}`);
        const record = ctx ? recordOf.get(ctx) : undefined;
        if (record) record.revoked_grant_id = grantId;
        revocations.push({
          grant_id: grantId,
          route: ctx?.oidc?.route,
          at: Date.now(),
          request_seq: record?.seq,
        });
      }
    });
  }

  provider.use(tokenMiddleware);
  return provider;
}

async function readBody(req, limit = 64 * 1024) {
  const chunks = [];
  let size = 0;
  for await (const chunk of req) {
    size += chunk.length;
    if (size > limit) throw new Error('request body too large');
    chunks.push(chunk);
  }
  return Buffer.concat(chunks).toString('utf8');
}

// Koa middleware in front of the provider's router: records /token requests, maps `audience` to
// `resource`, and applies armed faults.
async function tokenMiddleware(ctx, next) {
  if (ctx.method !== 'POST' || ctx.path !== '/token') {
    await next();
    return;
  }

  tokenRequests += 1;
  const record = {
    seq: tokenRequests - 1, at: Date.now(), status: undefined, fault: undefined,
  };
  recordOf.set(ctx, record);
  requests.push(record);
  if (requests.length > REQUESTS_KEPT) {
    requests.shift();
    requestsDropped += 1;
  }
  record.presented_client_id = basicClientId(ctx.get('authorization'));

  if (ctx.is('application/x-www-form-urlencoded')) {
    // Read the body here so `audience` can be seen; oidc-provider's own parser falls back to
    // `req.body` when the stream has been consumed (it logs a one-time notice about it).
    const raw = await readBody(ctx.req);
    const params = new URLSearchParams(raw);
    record.grant_type = params.get('grant_type') ?? undefined;
    record.client_id = params.get('client_id') ?? undefined;
    record.scope = params.get('scope') ?? undefined;
    record.audience = params.get('audience') ?? undefined;
    record.resource = params.get('resource') ?? undefined;
    record.refresh_token_fp = fingerprint(params.get('refresh_token') ?? undefined);
    record.presented_client_id ??= record.client_id;
    record.auth = ctx.get('authorization') ? ctx.get('authorization').split(' ')[0].toLowerCase()
      : (params.has('client_secret') ? 'post' : 'none');
    let body = raw;
    if (params.get('grant_type') === 'client_credentials'
      && params.has('audience') && !params.has('resource')) {
      const audience = params.get('audience');
      params.delete('audience');
      if (isAbsoluteUri(audience)) params.set('resource', audience);
      body = params.toString();
    }
    ctx.req.body = body;
  }

  const fault = takeFault();
  record.fault = fault?.mode;

  if (fault?.mode === 'drop_before') {
    record.done_at = Date.now();
    ctx.respond = false;
    ctx.req.socket.destroy();
    return;
  }
  if (fault?.mode === 'status') {
    ctx.status = fault.status;
    if (fault.retry_after !== undefined) ctx.set('Retry-After', String(fault.retry_after));
    ctx.set('Cache-Control', 'no-store');
    ctx.body = { error: fault.status === 429 ? 'slow_down' : 'temporarily_unavailable' };
    record.status = ctx.status;
    record.done_at = Date.now();
    return;
  }
  if (fault?.mode === 'html500') {
    ctx.status = 500;
    ctx.type = 'text/html';
    ctx.body = '<!DOCTYPE html><html><head><title>500 Internal Server Error</title></head>'
      + '<body><h1>Internal Server Error</h1><p>upstream exploded</p></body></html>';
    record.status = 500;
    record.done_at = Date.now();
    return;
  }

  await next();
  record.status = ctx.status;
  record.done_at = Date.now();
  // What the provider committed, before a fault strips or drops it.
  const entities = ctx.oidc?.entities ?? {};
  record.grant_id = (entities.RotatedRefreshToken ?? entities.RefreshToken)?.grantId;
  if (ctx.body && typeof ctx.body === 'object') {
    record.issued_refresh_token_fp = fingerprint(ctx.body.refresh_token);
    if (ctx.status >= 400) record.error = ctx.body.error;
  }
  if (record.issued_refresh_token_fp === record.refresh_token_fp) {
    record.issued_refresh_token_fp = undefined;
  }
  if (!fault) return;

  const okJson = ctx.status === 200 && ctx.body && typeof ctx.body === 'object';
  switch (fault.mode) {
    case 'strip_refresh_token':
      if (okJson) delete ctx.body.refresh_token;
      break;
    case 'strip_expires_in':
      if (okJson) delete ctx.body.expires_in;
      break;
    case 'expires_in_string':
      if (okJson && ctx.body.expires_in !== undefined) ctx.body.expires_in = String(ctx.body.expires_in);
      break;
    case 'garbage_200':
      if (ctx.status === 200) {
        ctx.type = 'application/json';
        ctx.body = '{"access_token":"trunc';
      }
      break;
    case 'drop_after_commit':
      ctx.respond = false;
      ctx.req.socket.destroy();
      break;
    case 'slow_after_commit':
      await new Promise((resolve) => { setTimeout(resolve, fault.delay_ms ?? 5000); });
      break;
    default:
      break;
  }
}

// ---------------------------------------------------------------------------------------------
function isLoopback(address) {
  return address === '127.0.0.1' || address === '::1' || address === '::ffff:127.0.0.1';
}

function sendJson(res, status, value) {
  const body = JSON.stringify(value);
  res.writeHead(status, {
    'content-type': 'application/json',
    'content-length': Buffer.byteLength(body),
    'cache-control': 'no-store',
  });
  res.end(body);
}

async function mintRefreshToken(provider) {
  const client = await provider.Client.find('rt-client');
  const grant = new provider.Grant({ accountId: TEST_ACCOUNT, clientId: client.clientId });
  grant.addOIDCScope(RT_SCOPE);
  const grantId = await grant.save();
  const refreshToken = new provider.RefreshToken({
    accountId: TEST_ACCOUNT,
    client,
    grantId,
    gty: 'authorization_code',
    scope: RT_SCOPE,
    rotations: 0,
  });
  const value = await refreshToken.save();
  mints.push({ refresh_token_fp: fingerprint(value), grant_id: grantId, at: Date.now() });
  return { refresh_token: value, grant_id: grantId };
}

async function handleTestEndpoint(provider, req, res, path) {
  if (!isLoopback(req.socket.remoteAddress)) {
    sendJson(res, 403, { error: 'loopback only' });
    return;
  }
  if (path === '/__mint_rt' && req.method === 'POST') {
    await readBody(req);
    sendJson(res, 200, await mintRefreshToken(provider));
    return;
  }
  if (path === '/__events' && req.method === 'GET') {
    sendJson(res, 200, {
      counts,
      token_requests: tokenRequests,
      requests,
      requests_dropped: requestsDropped,
      errors,
      mints,
      revocations,
    });
    return;
  }
  if (path === '/__events/reset' && req.method === 'POST') {
    await readBody(req);
    resetEvents();
    sendJson(res, 200, { ok: true });
    return;
  }
  if (path === '/__fault') {
    if (req.method === 'GET') {
      sendJson(res, 200, { armed: faults });
      return;
    }
    if (req.method === 'DELETE') {
      faults.length = 0;
      sendJson(res, 200, { ok: true });
      return;
    }
    if (req.method === 'POST') {
      const spec = JSON.parse((await readBody(req)) || '{}');
      if (!FAULT_MODES.has(spec.mode)) {
        sendJson(res, 400, { error: `unknown fault mode ${spec.mode}`, modes: [...FAULT_MODES] });
        return;
      }
      if (spec.mode === 'status' && !Number.isInteger(spec.status)) {
        sendJson(res, 400, { error: 'fault mode "status" needs an integer "status"' });
        return;
      }
      const times = spec.times ?? 1;
      faults.push({
        mode: spec.mode,
        remaining: times,
        status: spec.status,
        retry_after: spec.retry_after,
        delay_ms: spec.delay_ms,
      });
      sendJson(res, 200, { ok: true, armed: faults });
      return;
    }
  }
  sendJson(res, 404, { error: 'not found' });
}

let handler = (req, res) => sendJson(res, 503, { error: 'starting' });
const server = http.createServer((req, res) => handler(req, res));
server.keepAliveTimeout = 5_000;

server.listen(PORT, '127.0.0.1', () => {
  const { port } = server.address();
  const issuer = `http://127.0.0.1:${port}`;
  const provider = buildProvider(issuer);
  const callback = provider.callback();
  handler = (req, res) => {
    const path = (req.url ?? '/').split('?')[0];
    if (path.startsWith('/__')) {
      handleTestEndpoint(provider, req, res, path).catch((err) => {
        log('test endpoint error', err?.stack ?? err);
        if (!res.headersSent) sendJson(res, 500, { error: String(err?.message ?? err) });
      });
      return;
    }
    callback(req, res);
  };
  log(`listening issuer=${issuer} rotate=${ROTATE} at_ttl=${AT_TTL}s rt_ttl=${RT_TTL}s node=${process.version}`);
  process.stdout.write(`${JSON.stringify({ port })}\n`);
});

for (const signal of ['SIGTERM', 'SIGINT']) {
  process.on(signal, () => {
    server.close();
    process.exit(0);
  });
}
