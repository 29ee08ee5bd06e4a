-- The other protean-host connections to this database (by the application name every build sets),
-- for the migrations that need older servers stopped first. A role without pg_read_all_stats sees
-- other roles' connections without their address.
SELECT pid, application_name,
    CASE WHEN client_port = -1 THEN 'a local socket'
         ELSE coalesce(host(client_addr), 'an address hidden from this role') END
FROM pg_stat_activity
WHERE datname = current_database() AND pid <> pg_backend_pid() AND application_name LIKE 'protean-host%'
ORDER BY pid
