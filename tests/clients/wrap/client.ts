// GET each URL with Deno's fetch (HTTPS_PROXY; DENO_CERT for trust); prints status and body.
for (const url of Deno.args) {
  const r = await fetch(url);
  await Deno.stdout.write(new TextEncoder().encode(`${r.status} ${await r.text()}`));
}
