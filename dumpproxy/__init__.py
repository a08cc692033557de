"""dumpproxy: an intercepting HTTP(S) proxy that writes JSON Lines events."""

__version__ = "0.1.0"
