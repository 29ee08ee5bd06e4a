-- The other protean-host connections to this database (by the application name every build sets),
-- for the migrations that need older servers stopped first.
SELECT pid, application_name, coalesce(host(client_addr), 'a local socket')
FROM pg_stat_activity
WHERE datname = current_database() AND pid <> pg_backend_pid() AND application_name LIKE 'protean-host%'
ORDER BY pid
