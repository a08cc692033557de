-- dumpproxy events from many instances in one ClickHouse table.
-- Works from ClickHouse 18.16 (Debian bookworm's clickhouse-server) on.
-- One row per event; fields an event does not have get the column's default
-- (0 or ''), and fields without a column (headers, candidates, ...) are skipped
-- on insert (input_format_skip_unknown_fields=1, see load.sh).
--
-- Loading is idempotent: a row is identified by (instance, event, ts, line), `line`
-- being the event's line number in the file it was loaded from (added by load.sh), and
-- the ReplacingMergeTree keeps one row per identity. A capture loaded twice (a re-run
-- job, a rotated file loaded again) counts once in queries with FINAL (queries.sql uses
-- it), and in every query once ClickHouse has merged the parts (at once with
-- OPTIMIZE TABLE dumpproxy.events FINAL). Load a file the same way each time (as a
-- file, not through a pipe that joins it with others): line numbers are per file.
-- A table created before `line` existed (a plain MergeTree) is not changed by
-- CREATE ... IF NOT EXISTS: drop and reload it to get this behaviour.
CREATE DATABASE IF NOT EXISTS dumpproxy;

CREATE TABLE IF NOT EXISTS dumpproxy.events
(
    instance       String,   -- added on the way in: which dumpproxy wrote the line
    line           UInt64,   -- added on the way in: its line number in its file
    ts             Float64,  -- Unix seconds, microseconds
    time           DateTime MATERIALIZED toDateTime(toUInt32(ts)),
    event          String,
    conn           UInt64,
    client         String,
    flow           UInt64,
    address        String,   -- server_connect, decision, tls, error: host:port
    ip             String,   -- server_connect: the resolved peer
    connect_ms     Float64,
    action         String,   -- decision: intercept / passthrough
    reason         String,   -- decision: why; response: status text; shutdown: why
    pattern        Nullable(String),
    source         Nullable(String),
    sni            Nullable(String),
    method         String,
    url            String,
    host           String,
    port           UInt16,
    http_version   String,
    status         UInt16,
    request_bytes  UInt64,
    response_bytes UInt64,
    duration_ms    Float64,
    bytes_sent     UInt64,
    bytes_received UInt64,
    stage          String,   -- error
    message        String
)
ENGINE = ReplacingMergeTree
PARTITION BY toYYYYMM(time)
ORDER BY (instance, event, ts, line);
