// GET URL through HTTPS_PROXY with https-proxy-agent (Node before 24 ignores the proxy
// variables); trust comes from NODE_EXTRA_CA_CERTS. Prints the status and the body.
"use strict";
const https = require("https");
const { HttpsProxyAgent } = require("https-proxy-agent");

const agent = new HttpsProxyAgent(process.env.HTTPS_PROXY);
https.get(process.argv[2], { agent }, (res) => {
  const parts = [];
  res.on("data", (d) => parts.push(d));
  res.on("end", () => {
    process.stdout.write(`${res.statusCode} ${Buffer.concat(parts)}`);
    agent.destroy();
  });
}).on("error", (e) => {
  console.error(`error: ${e.code || ""} ${e.message}`);
  process.exit(1);
});
