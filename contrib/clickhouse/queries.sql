-- Three questions across every instance (clickhouse-client --multiquery < queries.sql).
-- FINAL: rows loaded twice and not merged yet count once (see schema.sql).

-- hosts contacted, per instance (logical host:port and the IP it resolved to)
SELECT instance, address, ip, count() AS connections
FROM dumpproxy.events FINAL
WHERE event = 'server_connect'
GROUP BY instance, address, ip
ORDER BY instance, address, ip;

-- status counts, all instances together
SELECT status, count() AS responses
FROM dumpproxy.events FINAL
WHERE event = 'response'
GROUP BY status
ORDER BY status;

-- the ten slowest URLs (slowest exchange of each), with the instance that saw it
SELECT url, max(duration_ms) AS slowest_ms, argMax(instance, duration_ms) AS instance,
       count() AS responses
FROM dumpproxy.events FINAL
WHERE event = 'response'
GROUP BY url
ORDER BY slowest_ms DESC, url
LIMIT 10;
