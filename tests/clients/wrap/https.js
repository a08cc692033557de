// GET each URL with https.get and the global agent; prints status and body.
"use strict";
const https = require("https");

function get(url) {
  return new Promise((resolve, reject) => {
    https.get(url, (res) => {
      const parts = [];
      res.on("data", (d) => parts.push(d));
      res.on("end", () => resolve(`${res.statusCode} ${Buffer.concat(parts)}`));
    }).on("error", reject);
  });
}

(async () => {
  for (const url of process.argv.slice(2)) process.stdout.write(await get(url));
})().catch((e) => {
  console.error(`error: ${e.code || ""} ${e.message}`);
  process.exit(1);
});
