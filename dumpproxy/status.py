"""Exit statuses and `shutdown` reasons: the closed lists the man page documents
(tests/test_cli_docs.py compares the page with these)."""

from __future__ import annotations

import signal

EXIT_OK = 0  # stopped by SIGINT/SIGTERM, the event reader went away, or a print-and-exit
EXIT_RUNTIME = 1  # a runtime failure: port in use, CA unwritable, output unwritable
EXIT_USAGE = 2  # a user mistake in the options
EXIT_BLOCKED = 3  # wrap mode: the egress policy blocked something and CMD exited 0
EXIT_CANNOT_EXECUTE = 126  # wrap mode: CMD found but could not be run
EXIT_NOT_FOUND = 127  # wrap mode: CMD not found
EXIT_SIGNAL_BASE = 128  # wrap mode: CMD killed by signal N gives 128+N
EXIT_INTERRUPTED = EXIT_SIGNAL_BASE + signal.SIGINT  # 130: a second SIGINT during shutdown
EXIT_TERMINATED = EXIT_SIGNAL_BASE + signal.SIGTERM  # 143: a second SIGTERM during shutdown

EXIT_STATUSES = (EXIT_OK, EXIT_RUNTIME, EXIT_USAGE, EXIT_BLOCKED, EXIT_CANNOT_EXECUTE,
                 EXIT_NOT_FOUND, EXIT_INTERRUPTED, EXIT_TERMINATED)

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
RELOAD_SIGNAL = signal.SIGHUP

# `shutdown` event reasons
REASON_SIGNALS = tuple(s.name for s in STOP_SIGNALS)  # "SIGINT", "SIGTERM"
REASON_OUTPUT_CLOSED = "output closed"  # the event reader went away
# writing events failed (disk full...): exit 1; the event itself cannot reach the output
REASON_OUTPUT_FAILED = "output failed"
REASON_COMMAND_EXITED = "command exited"  # wrap mode: CMD ended
REASON_CANNOT_RUN = "cannot run {command}"  # wrap mode: CMD could not be started
SHUTDOWN_REASONS = (*REASON_SIGNALS, REASON_OUTPUT_CLOSED, REASON_OUTPUT_FAILED,
                    REASON_COMMAND_EXITED, REASON_CANNOT_RUN)


def cannot_run(command: str) -> str:
    return REASON_CANNOT_RUN.format(command=command)
