// dumpproxy wrap mode: Node's own clients through the proxy variables, loaded with
// `--require` from NODE_OPTIONS (no npm package needed).
//
// Node >= 24 (and 22.21) do this themselves with NODE_USE_ENV_PROXY=1, which wrap mode
// also sets: Node has then installed its own proxy dispatcher for `fetch` before any
// preload runs, and this file does nothing. Older Node (18, 20, 22) reads no proxy
// variable at all; for them:
// - `fetch` (undici inside Node, not importable by name): undici keeps its global
//   dispatcher under Symbol.for('undici.globalDispatcher.1'); its Agent class is taken
//   from the default dispatcher and a new Agent, whose connections go through a CONNECT
//   tunnel, takes its place (the npm `undici` package shares that dispatcher too);
// - `http` and `https` requests made with the global agents: agents whose sockets are
//   CONNECT tunnels (TLS inside for https).
// Destinations in NO_PROXY, and the proxy itself, are reached directly. Deno and Bun,
// which read NODE_OPTIONS too, use the proxy variables themselves: nothing to do there.
'use strict';

(() => {
  if (process.versions.deno || process.versions.bun) return;
  const DISPATCHER = Symbol.for('undici.globalDispatcher.1');
  if (globalThis[DISPATCHER] !== undefined) return; // Node's own env proxy is in place

  const env = process.env;
  const proxyFor = {
    'https:': env.HTTPS_PROXY || env.https_proxy || '',
    'http:': env.HTTP_PROXY || env.http_proxy || '',
  };
  if (!proxyFor['https:'] && !proxyFor['http:']) return;

  const http = require('http');
  const https = require('https');
  const net = require('net');
  const tls = require('tls');

  function parseProxy(text) {
    try {
      const u = new URL(text.includes('://') ? text : `http://${text}`);
      if (u.protocol !== 'http:') return null; // only plain HTTP proxies (wrap mode's)
      const auth = u.username
        ? 'Basic ' + Buffer.from(`${decodeURIComponent(u.username)}:` +
                                 `${decodeURIComponent(u.password)}`).toString('base64')
        : null;
      return { host: u.hostname.replace(/^\[|\]$/g, ''), port: Number(u.port) || 80, auth };
    } catch {
      return null;
    }
  }
  const proxies = { 'https:': parseProxy(proxyFor['https:'] || ''),
                    'http:': parseProxy(proxyFor['http:'] || '') };

  const noProxy = (env.NO_PROXY || env.no_proxy || '').split(/[\s,]+/).filter(Boolean)
    .map((entry) => entry.toLowerCase());

  function bypass(host, port, proxy) {
    host = host.toLowerCase().replace(/^\[|\]$/g, '');
    if (host === proxy.host && port === proxy.port) return true;
    for (const entry of noProxy) {
      if (entry === '*') return true;
      const m = /^(.*?)(?::(\d+))?$/.exec(entry.replace(/^\[(.*)\](:\d+)?$/, '$1$2'));
      const name = m[1].replace(/^\*?\./, '');
      if (m[2] && Number(m[2]) !== port) continue;
      if (host === name || host.endsWith(`.${name}`)) return true;
    }
    return false;
  }

  // A socket to host:port: through a CONNECT tunnel, or direct (NO_PROXY, no proxy).
  function open(protocol, host, port, callback) {
    host = host.replace(/^\[|\]$/g, '');
    const proxy = proxies[protocol];
    if (!proxy || bypass(host, port, proxy)) {
      const sock = net.connect({ host, port });
      const failed = (err) => callback(err);
      sock.once('error', failed);
      sock.once('connect', () => { sock.removeListener('error', failed); callback(null, sock); });
      return;
    }
    const authority = net.isIPv6(host) ? `[${host}]:${port}` : `${host}:${port}`;
    const headers = { host: authority };
    if (proxy.auth) headers['proxy-authorization'] = proxy.auth;
    const req = http.request({ host: proxy.host, port: proxy.port, method: 'CONNECT',
                               path: authority, headers, agent: false });
    req.once('connect', (res, sock, head) => {
      if (res.statusCode !== 200) {
        sock.destroy();
        callback(new Error(`proxy ${proxy.host}:${proxy.port} answered ${res.statusCode} ` +
                           `to CONNECT ${authority}`));
        return;
      }
      if (head && head.length) sock.unshift(head);
      callback(null, sock);
    });
    req.once('error', callback);
    req.end();
  }

  function startTLS(sock, options, callback) {
    const s = tls.connect({ ...options, socket: sock });
    const failed = (err) => callback(err);
    s.once('error', failed);
    s.once('secureConnect', () => { s.removeListener('error', failed); callback(null, s); });
  }

  // -- fetch: undici's global dispatcher --------------------------------------------------
  void globalThis.Headers; // loads Node's undici, which installs its default Agent
  const Agent = globalThis[DISPATCHER] && globalThis[DISPATCHER].constructor;
  if (typeof Agent === 'function') {
    const connect = (opts, callback) => {
      const https = opts.protocol === 'https:';
      const port = Number(opts.port) || (https ? 443 : 80);
      open(opts.protocol, opts.hostname, port, (err, sock) => {
        if (err) return callback(err);
        sock.setNoDelay(true);
        if (!https) return callback(null, sock);
        const host = opts.hostname.replace(/^\[|\]$/g, '');
        const servername = opts.servername || (net.isIP(host) ? undefined : host);
        startTLS(sock, { host, servername, ALPNProtocols: ['http/1.1'] }, callback);
      });
    };
    globalThis[DISPATCHER] = new Agent({ connect });
  }

  // -- http and https: the global agents ----------------------------------------------------
  function tunnelling(Base, protocol) {
    return class extends Base {
      createConnection(options, callback) {
        const port = Number(options.port) || (protocol === 'https:' ? 443 : 80);
        const proxy = proxies[protocol];
        const host = options.host || 'localhost';
        if (!proxy || bypass(host, port, proxy)) return super.createConnection(options, callback);
        open(protocol, host, port, (err, sock) => {
          if (err) return callback(err);
          if (protocol === 'http:') return callback(null, sock);
          const servername = options.servername || (net.isIP(host) ? undefined : host);
          // the request's TLS options (ca, rejectUnauthorized, ...) apply inside the tunnel
          startTLS(sock, { ...options, servername }, callback);
        });
        return undefined; // the socket comes through the callback
      }
    };
  }
  const HttpAgent = tunnelling(http.Agent, 'http:');
  const HttpsAgent = tunnelling(https.Agent, 'https:');
  http.globalAgent = new HttpAgent({ ...http.globalAgent.options });
  https.globalAgent = new HttpsAgent({ ...https.globalAgent.options });
})();
