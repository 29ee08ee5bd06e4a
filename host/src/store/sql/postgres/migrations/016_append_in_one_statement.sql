-- Migration 16: a unit's append in one round trip (it was four: the locks, the stream versions, the
-- insert, the outbox rows). The store-wide append lock is held from the first of them to the COMMIT, so
-- every round trip between them was a wait for every other appender of the store.
--
-- The function does what the host did statement by statement, in the same order:
-- - the store-wide append lock, which serialises the host's appends as SQLite's write lock does (global
--   positions then become visible in order; see docs/architecture.md), then MessageDB's per-category
--   write locks in sorted order, recorded for the category-lock guard (migration 14);
-- - each message's stream position, after the stream's last, checking its expected version (which
--   chain within the unit); a conflict is returned, not raised, with nothing written, and the caller
--   rolls its transaction back;
-- - the messages, whose global positions are drawn in row order, and their outbox rows when `publish`.
--
-- It returns one row: the appended global positions in order, or (with `positions` NULL) the first
-- conflict: its stream, the version the message expected, and the stream's version it found.
CREATE FUNCTION protean.append_unit(
    ids text[], streams text[], expected bigint[], types text[], data text[], metadata text[],
    times text[], publish boolean
) RETURNS TABLE (positions bigint[], conflict_stream text, conflict_expected bigint, conflict_actual bigint)
LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    _positions bigint[];
    _global bigint[];
    _targets text[];
BEGIN
    PERFORM pg_advisory_xact_lock(7362836200114529281);
    -- A volatile call in the select list is evaluated after the sort.
    PERFORM set_config('protean.category_locks', ',' || string_agg(k::text, ',') || ',', true)
    FROM (
        SELECT message_store.hash_64(c) AS k, pg_advisory_xact_lock(message_store.hash_64(c))
        FROM (SELECT DISTINCT message_store.category(s) AS c FROM unnest(streams) AS s) AS categories
        ORDER BY c
    ) AS locked;

    _positions := ARRAY(
        SELECT v.version + row_number() OVER (PARTITION BY u.stream ORDER BY u.ord)
        FROM unnest(streams) WITH ORDINALITY AS u(stream, ord)
        JOIN (
            SELECT s, coalesce(
                (SELECT max(m.position) FROM message_store.messages AS m WHERE m.stream_name = s), -1
            ) AS version
            FROM (SELECT DISTINCT s FROM unnest(streams) AS s) AS distinct_streams
        ) AS v ON v.s = u.stream
        ORDER BY u.ord
    );
    FOR i IN 1 .. coalesce(array_length(streams, 1), 0) LOOP
        IF expected[i] IS NOT NULL AND expected[i] <> _positions[i] - 1 THEN
            RETURN QUERY SELECT NULL::bigint[], streams[i], expected[i], _positions[i] - 1;
            RETURN;
        END IF;
    END LOOP;

    WITH inserted AS (
        INSERT INTO message_store.messages (id, stream_name, position, type, data, metadata, time)
        SELECT t.id::uuid, t.stream_name, t.position, t.type, t.data::jsonb, t.metadata::jsonb,
               t.time::timestamptz AT TIME ZONE 'utc'
        FROM unnest(ids, streams, _positions, types, data, metadata, times)
            AS t (id, stream_name, position, type, data, metadata, time)
        RETURNING global_position, stream_name
    )
    SELECT array_agg(g.global_position ORDER BY g.global_position),
           array_agg(message_store.category(g.stream_name) ORDER BY g.global_position)
    INTO _global, _targets
    FROM inserted AS g;

    IF publish THEN
        INSERT INTO protean.outbox (global_position, target) SELECT * FROM unnest(_global, _targets);
    END IF;
    RETURN QUERY SELECT _global, NULL::text, NULL::bigint, NULL::bigint;
END $$;
