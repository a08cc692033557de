// Node's http2 client through a CONNECT proxy: N GETs on one session, then session.close()
// (GOAWAY, TLS close_notify, FIN). Any error, ECONNRESET included, exits 1.
"use strict";
const http = require("http");
const http2 = require("http2");
const tls = require("tls");

const [proxy, host, port, path, count] = process.argv.slice(2);
const p = new URL(proxy);

function fail(what, e) {
  console.error(`error (${what}): ${e.code || ""} ${e.message}`);
  process.exit(1);
}

http.request({ host: p.hostname, port: p.port, method: "CONNECT", path: `${host}:${port}` })
  .on("connect", (res, socket) => {
    if (res.statusCode !== 200) fail("connect", new Error(`status ${res.statusCode}`));
    let tsock = null;
    const session = http2.connect(`https://${host}:${port}`, {
      createConnection: () => {
        tsock = tls.connect({ socket, servername: host, ALPNProtocols: ["h2"] });
        tsock.on("error", (e) => fail("tls", e));
        socket.on("error", (e) => fail("tcp", e));
        return tsock;
      },
    });
    session.on("error", (e) => fail("session", e));
    let left = Number(count);
    const statuses = [];
    const next = () => {
      const req = session.request({ ":path": path });
      req.on("response", (h) => statuses.push(h[":status"]));
      req.on("error", (e) => fail("stream", e));
      req.resume();
      req.on("end", () => {
        if (--left > 0) return next();
        session.close(() => {
          // a reset would show up as an error before the TCP socket's close event
          const done = () => { console.log(statuses.join(" ")); process.exit(0); };
          if (socket.destroyed) done(); else socket.on("close", done);
        });
      });
    };
    next();
  })
  .on("error", (e) => fail("proxy", e))
  .end();
