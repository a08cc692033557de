"""Run-time configuration, built from the command line."""

from __future__ import annotations

from dataclasses import dataclass, field

from dumpproxy.hostfilter import FilterSources
from dumpproxy.modespec import ModeSpec
from dumpproxy.replay import Replay

REGULAR = ModeSpec("regular", "regular")


@dataclass
class Config:
    listen_host: str = "127.0.0.1"
    listen_port: int = 8080
    # one listener per mode; a mode without its own @HOST:PORT uses listen_host/port
    modes: tuple[ModeSpec, ...] = (REGULAR,)
    sources: FilterSources = field(default_factory=FilterSources)
    peek_timeout: float = 10.0
    ca_dir: str = ""
    ssl_insecure: bool = False
    upstream_ca: str | None = None
    bodies: bool = False
    max_body_bytes: int = 65536
    redact: bool = True
    proxyauth: str | None = None
    output: str | None = None
    format: str = "json"
    verbosity: int = 0  # -1 quiet, 0 normal, 1 verbose
    # wrap mode: Chromium/Chrome get the proxy and CA pin switches; CMD in a network
    # namespace of its own whose only way out is dumpproxy
    browser_flags: bool = True
    isolate: bool = False
    # SPEC §7 timeouts (seconds)
    head_timeout: float = 60.0  # a request head, or a tunnel's first byte, from the client
    response_timeout: float = 60.0  # the response head from the destination
    connect_timeout: float = 30.0  # TCP (and TLS) to the destination
    idle_timeout: float = 600.0  # no byte either way in a tunnel or body stream
    # SPEC §9.1: after SIGINT/SIGTERM (or CMD's exit), exchanges in flight may finish
    shutdown_grace: float = 5.0
    # SPEC §9.2: an idle upstream connection waits this long for another client (0: never)
    pool_idle_timeout: float = 15.0
    # SPEC §9.3: the recorded exchanges of --replay FILE... (None: no replay)
    replay: Replay | None = None
