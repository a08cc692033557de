"""GET each URL with aiohttp, trust_env=True (HTTPS_PROXY; SSL_CERT_FILE for trust);
prints status and body."""

import asyncio
import sys

import aiohttp


async def main(urls: list[str]) -> None:
    async with aiohttp.ClientSession(trust_env=True) as session:
        for url in urls:
            async with session.get(url) as r:
                sys.stdout.write(f"{r.status} {await r.text()}")


asyncio.run(main(sys.argv[1:]))
