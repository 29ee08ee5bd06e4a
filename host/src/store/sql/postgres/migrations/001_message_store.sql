-- Migration 1: MessageDB's message_store schema (message-db 1.3), so that MessageDB clients (Python
-- Protean's message_db adapter among them) read and write the same messages as the host. Every statement
-- tolerates an existing MessageDB install in the same database: the host adopts it instead of failing.
CREATE SCHEMA IF NOT EXISTS message_store;

CREATE TABLE IF NOT EXISTS message_store.messages (
    global_position bigserial NOT NULL,
    position        bigint    NOT NULL,
    time            timestamp without time zone DEFAULT (now() AT TIME ZONE 'utc') NOT NULL,
    stream_name     text      NOT NULL,
    type            text      NOT NULL,
    data            jsonb,
    metadata        jsonb,
    id              uuid      NOT NULL DEFAULT gen_random_uuid(),
    CONSTRAINT messages_pkey PRIMARY KEY (global_position)
);

DO $$ BEGIN
    CREATE TYPE message_store.message AS (
        id varchar, stream_name varchar, type varchar, position bigint, global_position bigint,
        data varchar, metadata varchar, time timestamp
    );
EXCEPTION WHEN duplicate_object THEN NULL;
END $$;

-- The functions, unless MessageDB's own are installed already: an existing install keeps its functions
-- (clients and the host call them alike; their signatures are MessageDB's), a new one gets these.
DO $adopt$
BEGIN
    IF to_regprocedure('message_store.write_message(varchar, varchar, varchar, jsonb, jsonb, bigint)') IS NOT NULL THEN
        RAISE NOTICE 'message_store functions found (an existing MessageDB install): kept as they are';
        RETURN;
    END IF;
    -- SQL (not plpgsql) so the planner inlines it: the category index and the host's category reads use the
    -- same expression, and appends do not pay a function call per row for the index.
    EXECUTE $fn$
CREATE OR REPLACE FUNCTION message_store.category(stream_name varchar) RETURNS varchar
    LANGUAGE sql IMMUTABLE AS $$ SELECT split_part(stream_name, '-', 1) $$
    $fn$;

    EXECUTE $fn$
CREATE OR REPLACE FUNCTION message_store.id(stream_name varchar) RETURNS varchar
    LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE WHEN strpos(stream_name, '-') = 0 THEN NULL
                ELSE substring(stream_name, strpos(stream_name, '-') + 1) END $$
    $fn$;

    EXECUTE $fn$
CREATE OR REPLACE FUNCTION message_store.cardinal_id(stream_name varchar) RETURNS varchar
    LANGUAGE sql IMMUTABLE AS $$ SELECT split_part(message_store.id(stream_name), '+', 1) $$
    $fn$;

    EXECUTE $fn$
CREATE OR REPLACE FUNCTION message_store.is_category(stream_name varchar) RETURNS boolean
    LANGUAGE sql IMMUTABLE AS $$ SELECT strpos(stream_name, '-') = 0 $$
    $fn$;

    EXECUTE $fn$
CREATE OR REPLACE FUNCTION message_store.hash_64(value varchar) RETURNS bigint
    LANGUAGE sql IMMUTABLE AS $$ SELECT left('x' || md5(value), 17)::bit(64)::bigint $$
    $fn$;

    EXECUTE $fn$
CREATE OR REPLACE FUNCTION message_store.message_store_version() RETURNS varchar
    LANGUAGE sql AS $$ SELECT '1.3.0'::varchar $$
    $fn$;

    -- Writers of one category are serialised by this transaction lock, as in MessageDB; the host takes the
    -- same lock, so its appends and a MessageDB client's never race on a stream's version.
    EXECUTE $fn$
CREATE OR REPLACE FUNCTION message_store.acquire_lock(stream_name varchar) RETURNS bigint
    LANGUAGE plpgsql AS $$
DECLARE
    _category_name_hash bigint := message_store.hash_64(message_store.category(stream_name));
BEGIN
    PERFORM pg_advisory_xact_lock(_category_name_hash);
    RETURN _category_name_hash;
END $$
    $fn$;

    EXECUTE $fn$
CREATE OR REPLACE FUNCTION message_store.stream_version(stream_name varchar) RETURNS bigint
    LANGUAGE sql AS $$
    SELECT max(position) FROM message_store.messages m WHERE m.stream_name = stream_version.stream_name $$
    $fn$;

    EXECUTE $fn$
CREATE OR REPLACE FUNCTION message_store.write_message(
    id varchar, stream_name varchar, type varchar, data jsonb, metadata jsonb DEFAULT NULL,
    expected_version bigint DEFAULT NULL
) RETURNS bigint LANGUAGE plpgsql AS $$
DECLARE
    _stream_version bigint;
    _next_position bigint;
BEGIN
    PERFORM message_store.acquire_lock(write_message.stream_name);
    _stream_version := coalesce(message_store.stream_version(write_message.stream_name), -1);
    IF write_message.expected_version IS NOT NULL AND write_message.expected_version != _stream_version THEN
        RAISE EXCEPTION 'Wrong expected version: % (Stream: %, Stream Version: %)',
            write_message.expected_version, write_message.stream_name, _stream_version;
    END IF;
    _next_position := _stream_version + 1;
    INSERT INTO message_store.messages (id, stream_name, position, type, data, metadata)
    VALUES (write_message.id::uuid, write_message.stream_name, _next_position, write_message.type,
            write_message.data, write_message.metadata);
    RETURN _next_position;
END $$
    $fn$;

    EXECUTE $fn$
CREATE OR REPLACE FUNCTION message_store.get_stream_messages(
    stream_name varchar, "position" bigint DEFAULT 0, batch_size bigint DEFAULT 1000,
    condition varchar DEFAULT NULL
) RETURNS SETOF message_store.message LANGUAGE plpgsql AS $$
DECLARE
    _command text;
BEGIN
    IF message_store.is_category(get_stream_messages.stream_name) THEN
        RAISE EXCEPTION 'Must be a stream name: %', get_stream_messages.stream_name;
    END IF;
    _command := 'SELECT id::varchar, stream_name::varchar, type::varchar, position::bigint,
        global_position::bigint, data::varchar, metadata::varchar, time::timestamp
        FROM message_store.messages WHERE stream_name = $1 AND position >= $2';
    IF get_stream_messages.condition IS NOT NULL THEN
        IF current_setting('message_store.sql_condition', true) IS DISTINCT FROM 'on' THEN
            RAISE EXCEPTION 'Retrieval with SQL condition is not activated';
        END IF;
        _command := _command || ' AND (' || get_stream_messages.condition || ')';
    END IF;
    _command := _command || ' ORDER BY position ASC';
    IF coalesce(get_stream_messages.batch_size, 1000) != -1 THEN
        _command := _command || ' LIMIT $3';
    END IF;
    RETURN QUERY EXECUTE _command USING get_stream_messages.stream_name,
        coalesce(get_stream_messages.position, 0), coalesce(get_stream_messages.batch_size, 1000);
END $$
    $fn$;

    EXECUTE $fn$
CREATE OR REPLACE FUNCTION message_store.get_category_messages(
    category varchar, "position" bigint DEFAULT 1, batch_size bigint DEFAULT 1000,
    correlation varchar DEFAULT NULL, consumer_group_member bigint DEFAULT NULL,
    consumer_group_size bigint DEFAULT NULL, condition varchar DEFAULT NULL
) RETURNS SETOF message_store.message LANGUAGE plpgsql AS $$
DECLARE
    _command text;
BEGIN
    IF NOT message_store.is_category(get_category_messages.category) THEN
        RAISE EXCEPTION 'Must be a category: %', get_category_messages.category;
    END IF;
    _command := 'SELECT id::varchar, stream_name::varchar, type::varchar, position::bigint,
        global_position::bigint, data::varchar, metadata::varchar, time::timestamp
        FROM message_store.messages
        WHERE message_store.category(stream_name) = $1 AND global_position >= $2';
    IF get_category_messages.correlation IS NOT NULL THEN
        IF position('-' IN get_category_messages.correlation) > 0 THEN
            RAISE EXCEPTION 'Correlation must be a category (Correlation: %)', get_category_messages.correlation;
        END IF;
        _command := _command || ' AND message_store.category(metadata->>''correlationStreamName'') = $4';
    END IF;
    IF get_category_messages.consumer_group_member IS NOT NULL
       OR get_category_messages.consumer_group_size IS NOT NULL THEN
        IF get_category_messages.consumer_group_member IS NULL
           OR get_category_messages.consumer_group_size IS NULL
           OR get_category_messages.consumer_group_size < 1
           OR get_category_messages.consumer_group_member < 0
           OR get_category_messages.consumer_group_member >= get_category_messages.consumer_group_size THEN
            RAISE EXCEPTION 'Invalid consumer group (Member: %, Size: %)',
                get_category_messages.consumer_group_member, get_category_messages.consumer_group_size;
        END IF;
        _command := _command || ' AND MOD(@message_store.hash_64(message_store.cardinal_id(stream_name)), $6) = $5';
    END IF;
    IF get_category_messages.condition IS NOT NULL THEN
        IF current_setting('message_store.sql_condition', true) IS DISTINCT FROM 'on' THEN
            RAISE EXCEPTION 'Retrieval with SQL condition is not activated';
        END IF;
        _command := _command || ' AND (' || get_category_messages.condition || ')';
    END IF;
    _command := _command || ' ORDER BY global_position ASC';
    IF coalesce(get_category_messages.batch_size, 1000) != -1 THEN
        _command := _command || ' LIMIT $3';
    END IF;
    RETURN QUERY EXECUTE _command USING get_category_messages.category,
        coalesce(get_category_messages.position, 1), coalesce(get_category_messages.batch_size, 1000),
        get_category_messages.correlation, get_category_messages.consumer_group_member,
        get_category_messages.consumer_group_size;
END $$
    $fn$;

    EXECUTE $fn$
CREATE OR REPLACE FUNCTION message_store.get_last_stream_message(stream_name varchar, type varchar DEFAULT NULL)
RETURNS SETOF message_store.message LANGUAGE sql AS $$
    SELECT id::varchar, stream_name::varchar, type::varchar, position::bigint, global_position::bigint,
           data::varchar, metadata::varchar, time::timestamp
    FROM message_store.messages m
    WHERE m.stream_name = get_last_stream_message.stream_name
      AND (get_last_stream_message.type IS NULL OR m.type = get_last_stream_message.type)
    ORDER BY position DESC
    LIMIT 1 $$
    $fn$;
END $adopt$;

CREATE UNIQUE INDEX IF NOT EXISTS messages_id ON message_store.messages (id);
CREATE UNIQUE INDEX IF NOT EXISTS messages_stream ON message_store.messages (stream_name, position);
CREATE INDEX IF NOT EXISTS messages_category ON message_store.messages
    (message_store.category(stream_name), global_position, message_store.category(metadata->>'correlationStreamName'));

-- MessageDB clients call its functions unqualified (message-db-py: `SELECT * FROM get_stream_messages(...)`);
-- MessageDB's installer puts message_store on its role's search path. The host connects as any role, so
-- the database gets message_store at the end of its default search path instead (new sessions only).
-- Without the privilege to alter the database, setup goes on and says so: the host itself needs none of it.
DO $$
BEGIN
    EXECUTE format('ALTER DATABASE %I SET search_path TO "$user", public, message_store', current_database());
EXCEPTION WHEN insufficient_privilege THEN
    RAISE NOTICE 'cannot set the search path of database %; MessageDB clients must set search_path to message_store', current_database();
END $$;
