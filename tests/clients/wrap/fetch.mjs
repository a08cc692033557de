// GET each URL with fetch (Node, Deno and Bun alike); prints status and body.
for (const url of process.argv.slice(2)) {
  const r = await fetch(url);
  process.stdout.write(`${r.status} ${await r.text()}`);
}
