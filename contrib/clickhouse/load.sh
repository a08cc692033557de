#!/usr/bin/env bash
# Load dumpproxy event files (or stdin) into dumpproxy.events, each line tagged with the
# instance that wrote it and its line number (loading a file again adds nothing: see
# schema.sql):  load.sh INSTANCE [FILE...]
# clickhouse-client options (--host, --port, --user, ...) go in $CLICKHOUSE_CLIENT_ARGS.
set -euo pipefail
instance=${1:?usage: load.sh INSTANCE [FILE...]}
shift
jq -c --arg instance "$instance" '{instance: $instance, line: input_line_number} + .' "$@" | clickhouse-client ${CLICKHOUSE_CLIENT_ARGS:-} --input_format_skip_unknown_fields=1 --query 'INSERT INTO dumpproxy.events FORMAT JSONEachRow'
