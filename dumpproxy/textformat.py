"""`--format text`: the human event log, in the shape of mitmdump's (pure)."""

from __future__ import annotations


def pretty_size(n: int) -> str:
    if n < 1024:
        return f"{n}b"
    size = float(n)
    for suffix in "kmgt":
        size /= 1024
        if size < 1024 or suffix == "t":
            return f"{size:.2f}".rstrip("0").rstrip(".") + suffix
    raise AssertionError("unreachable")


def _peer(ev: dict) -> str:
    address, ip = ev.get("address"), ev.get("ip")
    return address if not ip or ip == address else f"{address} ({ip})"


def format_text(ev: dict) -> str | None:
    """One or two lines (newline-terminated) for an event, or None to print nothing."""
    kind = ev["event"]
    who = f"{ev['client']}: " if "client" in ev else ""
    if kind == "listening":
        return f"Proxy server listening at http://{ev['address']} (mode {ev['mode']})\n"
    if kind == "client_connect":
        return f"{who}client connect\n"
    if kind == "client_disconnect":
        return f"{who}client disconnect\n"
    if kind == "server_connect":
        via = f" via {ev['via']}" if "via" in ev else ""  # upstream mode
        return f"{who}server connect {_peer(ev)}{via}\n"
    if kind == "server_disconnect":
        return f"{who}server disconnect {_peer(ev)}\n"
    if kind == "decision":
        # the pattern as written (not repr: that would double every backslash)
        why = ev["reason"] if ev["pattern"] is None else f"{ev['reason']} '{ev['pattern']}'"
        if ev["action"] == "block" and ev["source"]:
            why += f" {ev['source']}"
        elif ev.get("would_block"):
            why += f"; would block: {ev['egress_reason']}"
        return f"{who}{ev['action']} {ev['address']} ({why})\n"
    if kind == "tls":
        return None  # mitmdump prints successful handshakes only in verbose mode
    if kind == "request":
        return None  # printed with its response, as mitmdump does
    if kind == "response":
        reason = f" {ev['reason']}" if ev.get("reason") else ""
        return (
            f"{who}{ev['method']} {ev['url']} {ev['http_version']}\n"
            f"     << {ev['http_version']} {ev['status']}{reason} "
            f"{pretty_size(ev['response_bytes'])}\n"
        )
    if kind == "error":
        where = f" {ev['address']}" if ev.get("address") else ""
        message = " ".join(ev["message"].splitlines())  # one line, whatever a peer sent
        return f"{who}error ({ev['stage']}){where}: {message}\n"
    if kind == "shutdown":
        return (
            f"shutdown ({ev['reason']}): {ev['connections']} connections, "
            f"{ev['requests']} requests, {ev['passthrough']} passed through, "
            f"{ev['errors']} errors"
            + (f", {ev['blocked']} blocked, {ev['would_block']} would block"
               if "blocked" in ev else "") + "\n"
        )
    return None


def error_line(ev: dict) -> str:
    """An `error` event as the one line stderr gets by default (-q: none), so that a
    person whose stdout goes to jq or a file still sees why a client failed."""
    return "dumpproxy: " + format_text(ev)  # type: ignore[operator]
