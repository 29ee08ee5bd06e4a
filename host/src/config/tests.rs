//! The configuration end to end: text in, resolved settings or one-line errors out.

use std::{path::Path, time::Duration};

use protean_plugin_api::HandlerOptions;

use super::*;
use crate::store::StoreConfig;

fn parse(text: &str, env: &[(&str, &str)]) -> Result<Config, Error> {
    let env = env
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    Config::parse(text, Path::new("protean.toml"), &env)
}

#[test]
fn defaults_are_sqlite_under_dot_protean() {
    let config = parse("", &[]).unwrap();
    assert_eq!(
        config.store,
        StoreConfig::Sqlite {
            path: DEFAULT_STORE_PATH.into()
        }
    );
    assert_eq!(
        config.settings("any", &HandlerOptions::default()),
        Settings::default()
    );
    assert_eq!(
        config,
        Config::default(),
        "an empty file resolves to the defaults"
    );
}

#[test]
fn settings_resolve_from_defaults_to_handler_keys() {
    let config = parse(
        r#"
        [server]
        profile = "fast"
        max_retries = 4
        [server.handlers.inventory]
        profile = "careful"
        messages_per_tick = 7
        handler_timeout_ms = 900
        [profiles.careful]
        retry_delay_ms = 5000
        "#,
        &[],
    )
    .unwrap();
    let declared = HandlerOptions {
        max_retries: Some(9),
        messages_per_tick: Some(50),
        timeout_ms: Some(2000),
        ..HandlerOptions::default()
    };
    let other = config.settings("billing", &declared);
    assert_eq!(
        (
            other.messages_per_tick,
            other.max_retries,
            other.retry_delay_ms
        ),
        (50, 9, 100)
    );
    let inventory = config.settings("inventory", &declared);
    assert_eq!(
        (
            inventory.messages_per_tick,
            inventory.max_retries,
            inventory.retry_delay_ms
        ),
        (7, 9, 5000)
    );
    let plain = config.settings("billing", &HandlerOptions::default());
    assert_eq!((plain.messages_per_tick, plain.max_retries), (10, 4));
    // A deadline: the default, what the handler declares in code, the operator's key over both.
    assert_eq!(plain.handler_timeout_ms, 30_000);
    assert_eq!(other.handler_timeout_ms, 2000);
    assert_eq!(inventory.handler_timeout_ms, 900);
}

#[test]
fn variables_and_env_overlays() {
    let text = r#"
        [store]
        path = "${DATA|/tmp}/store.db"
        [env.production.store]
        path = "${PROD_PATH}"
    "#;
    assert_eq!(
        parse(text, &[]).unwrap().store,
        StoreConfig::Sqlite {
            path: "/tmp/store.db".into()
        }
    );
    assert_eq!(
        parse(text, &[("DATA", "/d")]).unwrap().store,
        StoreConfig::Sqlite {
            path: "/d/store.db".into()
        }
    );
    let prod = parse(
        text,
        &[("PROTEAN_ENV", "production"), ("PROD_PATH", "/p.db")],
    )
    .unwrap();
    assert_eq!(
        prod.store,
        StoreConfig::Sqlite {
            path: "/p.db".into()
        }
    );
    let unset = parse(text, &[("PROTEAN_ENV", "production")]).unwrap_err();
    assert_eq!(
        unset.to_string(),
        "config file protean.toml: store.path: environment variable PROD_PATH is not set; set it or write ${PROD_PATH|default}"
    );
}

#[test]
fn a_broker_makes_streams_possible() {
    let config = parse(
        "[brokers.default]\nuri = \"redis://127.0.0.1:6390/0\"\nclaim_idle_ms = 500\n[server.handlers.x]\nsubscription_type = \"event_store\"\n",
        &[],
    )
    .unwrap();
    let broker = config.broker.clone().unwrap();
    assert_eq!(
        (broker.claim_idle, broker.block),
        (Duration::from_millis(500), Duration::from_secs(1))
    );
    assert_eq!(
        config.subscription_type("x"),
        Some(SubscriptionType::EventStore)
    );
    assert_eq!(
        config.subscription_type("y"),
        None,
        "the engine picks the default by handler kind"
    );
    let no_broker = parse("[server]\nsubscription_type = \"stream\"\n", &[]).unwrap_err();
    assert!(
        no_broker
            .to_string()
            .contains("needs a broker; add [brokers.default]"),
        "{no_broker}"
    );
    let other = parse("[brokers.events]\nuri = \"redis://x\"\n", &[]).unwrap_err();
    assert!(
        other
            .to_string()
            .contains("only [brokers.default] is supported"),
        "{other}"
    );
}

#[test]
fn health_settings_default_and_errors_name_the_key() {
    let config = parse("", &[]).unwrap();
    assert_eq!(config.health, HealthSettings::default());
    assert!(config.health.runs(false) && !config.health.runs(true));
    let on = parse(
        "[server.health]\nenabled = true\nport = 0\nstall_after_ms = 250\n",
        &[],
    )
    .unwrap();
    assert!(on.health.runs(true));
    assert_eq!(
        (on.health.port, on.health.stall_after),
        (0, Duration::from_millis(250))
    );
    let cases = [
        (
            "port = 70000",
            "server.health.port: invalid value: integer `70000`, expected u16",
        ),
        (
            "port = \"http\"",
            "server.health.port: invalid type: string \"http\", expected u16",
        ),
        (
            "host = \"example\"",
            "server.health.host: \"example\" is not an IP address; write 127.0.0.1",
        ),
        (
            "stall_after_ms = 0",
            "server.health.stall_after_ms: must be at least 1",
        ),
        (
            "request_timeout_ms = 0",
            "server.health.request_timeout_ms: must be at least 1",
        ),
        (
            "check_timeout_ms = 0",
            "server.health.check_timeout_ms: must be at least 1",
        ),
        (
            "stall_after = 5",
            "server.health.stall_after: unknown field `stall_after`, expected one of",
        ),
    ];
    for (line, expected) in cases {
        let error = parse(&format!("[server.health]\n{line}\n"), &[])
            .unwrap_err()
            .to_string();
        assert!(
            error.starts_with(&format!("config file protean.toml: {expected}")),
            "{line}: {error}"
        );
        assert_eq!(error.lines().count(), 1, "one line: {error}");
    }
}

/// Half the CPUs this process may use, at least one, unless `[server] runtime_threads` says.
#[test]
fn the_runtime_takes_half_the_cpus_unless_told() {
    let cpus = std::thread::available_parallelism().unwrap().get();
    assert_eq!(parse("", &[]).unwrap().runtime_threads(), (cpus / 2).max(1));
    let told = parse("[server]\nruntime_threads = 3\n", &[]).unwrap();
    assert_eq!(told.runtime_threads(), 3);
}

#[test]
fn the_message_size_limit_defaults_to_1_mib_and_reaches_every_subscription() {
    let defaults = parse("", &[]).unwrap();
    assert_eq!(defaults.max_message_bytes, 1_048_576);
    let raised = parse(
        "[server]\nmax_message_bytes = 20000000\n[server.handlers.x]\nprofile = \"fast\"\n",
        &[],
    )
    .unwrap();
    assert_eq!(raised.max_message_bytes, 20_000_000);
    for handler in ["x", "y"] {
        assert_eq!(
            raised
                .settings(handler, &HandlerOptions::default())
                .max_message_bytes,
            20_000_000,
            "{handler}"
        );
    }
}

#[test]
fn the_probe_time_limit_defaults_to_30_seconds_and_is_configurable() {
    assert_eq!(
        parse("", &[]).unwrap().probe_timeout,
        Duration::from_secs(30)
    );
    let config = parse("[server]\nprobe_timeout_seconds = 5\n", &[]).unwrap();
    assert_eq!(config.probe_timeout, Duration::from_secs(5));
}

#[test]
fn the_outbox_lease_is_configurable_and_max_attempts_still_reads() {
    let config = parse("[outbox]\nmax_attempts = 3\nlease_ttl_ms = 1500\n", &[]).unwrap();
    assert_eq!(
        (config.outbox.max_attempts, config.outbox.lease_ttl),
        (3, Duration::from_millis(1500))
    );
    let defaults = parse("", &[]).unwrap();
    assert_eq!(defaults.outbox.lease_ttl, Duration::from_secs(5));
}

#[test]
fn errors_name_the_key_and_the_fix() {
    let cases = [
        ("[server]\nmax_retrys = 3", "config file protean.toml: server.max_retrys: unknown field `max_retrys`, expected one of"),
        ("[server]\nmessages_per_tick = \"ten\"", "config file protean.toml: server.messages_per_tick: invalid type: string \"ten\", expected u32"),
        ("[server]\nmessages_per_tick = 0", "config file protean.toml: server.messages_per_tick: must be at least 1"),
        ("[server]\nhandler_timeout_ms = 0", "config file protean.toml: server.handler_timeout_ms: must be at least 1 (a handler needs some time; raise it for slow handlers)"),
        ("[server.handlers.x]\nhandler_timeout_ms = 0", "config file protean.toml: server.handlers.x.handler_timeout_ms: must be at least 1 (a handler needs some time; raise it for slow handlers)"),
        ("[store]\nprovider = \"mysql\"", "config file protean.toml: store.provider: unknown variant `mysql`, expected one of `memory`, `sqlite`, `postgres`"),
        ("[store]\nprovider = \"postgres\"", "config file protean.toml: store.uri: is required for provider = \"postgres\"; set it like uri = \"postgresql://user:password@host:5432/database\""),
        ("[store]\nprovider = \"postgres\"\nuri = \"postgresql://h:notaport/db\"", "config file protean.toml: store.uri: invalid connection string: invalid value for option `port`; expected a URI like postgresql://"),
        ("[store]\nprovider = \"postgres\"\nuri = \"postgresql://h/db\"\npool_size = 0", "config file protean.toml: store.pool_size: must be at least 1"),
        ("[store]\nuri = \"postgresql://h/db\"", "config file protean.toml: store.uri: applies to provider = \"postgres\" only"),
        ("[server.handlers.x]\nprofile = \"nope\"", "config file protean.toml: server.handlers.x.profile: unknown profile \"nope\"; known profiles: fast, batch, debug"),
        ("[profiles.fast]\nmax_retries = 1", "config file protean.toml: profiles.fast: \"fast\" is a built-in profile; choose another name"),
        ("[server\nx = 1", "config file protean.toml, line 1: invalid table header; expected `.`, `]`"),
        ("[server.ordering]\npartitions = 0", "config file protean.toml: server.ordering.partitions: must be between 1 and 4096"),
        ("[server.ordering]\nworkers = 0", "config file protean.toml: server.ordering.workers: must be at least 1"),
        ("[server.ordering]\nlease_ttl_ms = 5", "config file protean.toml: server.ordering.lease_ttl_ms: must be at least 100"),
        ("[server.ordering]\nparts = 3", "config file protean.toml: server.ordering.parts: unknown field `parts`"),
        ("[outbox]\nlease_ttl_ms = 0", "config file protean.toml: outbox.lease_ttl_ms: must be at least 100"),
        ("[outbox]\nmax_attempts = 0", "config file protean.toml: outbox.max_attempts: must be at least 1"),
        ("[outbox]\nmessages_per_tick = 0", "config file protean.toml: outbox.messages_per_tick: must be at least 1"),
        ("[server.health]\noutbox_max_age_ms = 0", "config file protean.toml: server.health.outbox_max_age_ms: must be at least 1"),
        ("[server]\nlease_ttl_ms = 0", "config file protean.toml: server.lease_ttl_ms: must be at least 100"),
        ("[server]\nlease_ttl_ms = 99", "config file protean.toml: server.lease_ttl_ms: must be at least 100"),
        ("[server]\ntest_mode_timeout_seconds = 0", "config file protean.toml: server.test_mode_timeout_seconds: must be at least 1"),
        ("[server]\nmax_message_bytes = 1", "config file protean.toml: server.max_message_bytes: 1 is below 4096; the value is in bytes (1 MiB = 1048576)"),
        ("[server]\nmax_message_bytes = 300000000", "config file protean.toml: server.max_message_bytes: 300000000 is above 268435455, the most a PostgreSQL jsonb value holds"),
        ("[server]\nmax_message_bytes = \"1MB\"", "config file protean.toml: server.max_message_bytes: invalid type: string \"1MB\", expected u64"),
        ("[server]\nmax_message_bytes = -1", "config file protean.toml: server.max_message_bytes: invalid value: integer `-1`, expected u64"),
        ("[server]\nprobe_timeout_seconds = 0", "config file protean.toml: server.probe_timeout_seconds: must be at least 1 (the seconds a new build may take to load and construct its domain instance)"),
        ("[server]\nprobe_timeout_seconds = -1", "config file protean.toml: server.probe_timeout_seconds: invalid value: integer `-1`, expected u64"),
        ("[server]\nruntime_threads = 0", "config file protean.toml: server.runtime_threads: must be at least 1"),
        ("[server]\nruntime_threads = 70000", "config file protean.toml: server.runtime_threads: invalid value: integer `70000`, expected u16"),
        ("[brokers.default]\nuri = \"redis://h\"\nclaim_idle_ms = 0", "config file protean.toml: brokers.default.claim_idle_ms: must be at least 1"),
        ("[brokers.default]\nuri = \"redis://h\"\nreclaim_interval_ms = 0", "config file protean.toml: brokers.default.reclaim_interval_ms: must be at least 1"),
        ("[brokers.default]\nuri = \"app:s3cret@h\"", "config file protean.toml: brokers.default.uri: is not a URI (no scheme://)"),
        ("[server]\nisolation = \"thread\"", "config file protean.toml: server.isolation: unknown variant `thread`, expected `none` or `process`"),
        ("[server.worker]\nmemory_limit_mb = 64", "config file protean.toml: server.worker.memory_limit_mb: applies to isolation = \"process\" only"),
        ("[server]\nisolation = \"process\"\n[server.worker]\ncpu_limit_seconds = 0", "config file protean.toml: server.worker.cpu_limit_seconds: must be at least 1"),
    ];
    for (text, expected) in cases {
        let error = parse(text, &[]).unwrap_err().to_string();
        assert!(
            error.starts_with(expected),
            "{text:?}:\n  got      {error}\n  expected {expected}"
        );
        assert_eq!(error.lines().count(), 1, "one line: {error}");
    }
}

#[test]
fn a_lease_below_100_ms_is_refused_in_every_section_never_clamped() {
    for section in ["[server]", "[server.ordering]", "[outbox]"] {
        let key = format!("{}.lease_ttl_ms", section.trim_matches(['[', ']']));
        for bad in [0, 99] {
            let error = parse(&format!("{section}\nlease_ttl_ms = {bad}\n"), &[])
                .unwrap_err()
                .to_string();
            assert_eq!(
                error,
                format!("config file protean.toml: {key}: must be at least 100"),
                "{section} {bad}"
            );
        }
    }
    let lowest = parse(
        "[server]\nlease_ttl_ms = 100\n[server.ordering]\nlease_ttl_ms = 100\n[outbox]\nlease_ttl_ms = 100\n",
        &[],
    )
    .unwrap();
    let ms100 = Duration::from_millis(100);
    assert_eq!(
        (
            lowest.lease_ttl,
            lowest.ordering.lease_ttl,
            lowest.outbox.lease_ttl
        ),
        (ms100, ms100, ms100)
    );
}

#[test]
fn isolation_is_in_process_unless_asked_with_its_limits() {
    let default = parse("", &[]).unwrap();
    assert_eq!(default.isolation, IsolationSettings::default());
    assert_eq!(default.handler_timeout, Duration::from_secs(30));
    let isolated = parse(
        "[server]\nisolation = \"process\"\nhandler_timeout_ms = 500\n[server.worker]\nmemory_limit_mb = 256\ncpu_limit_seconds = 5\n",
        &[],
    )
    .unwrap();
    assert_eq!(
        isolated.isolation,
        IsolationSettings {
            mode: IsolationMode::Process,
            memory_limit_mb: Some(256),
            cpu_limit_seconds: Some(5),
        }
    );
    assert_eq!(isolated.handler_timeout, Duration::from_millis(500));
}

/// The README's configuration reference: its first two TOML blocks (defaults; keys without one).
fn readme_reference() -> (&'static str, &'static str) {
    let readme = include_str!("../../../README.md");
    let section = &readme[readme
        .find("### Configuration: `protean.toml`")
        .expect("the README has its configuration reference")..];
    let mut blocks = section
        .split("```toml\n")
        .skip(1)
        .map(|block| block.split_once("```").expect("a closed code block").0);
    (blocks.next().unwrap(), blocks.next().unwrap())
}

#[test]
fn the_readme_reference_shows_every_default_as_it_is() {
    let (defaults, _) = readme_reference();
    let mut config = parse(defaults, &[]).unwrap();
    assert_eq!(
        config.settings("any", &HandlerOptions::default()),
        Settings::default()
    );
    // The subscription keys of [server] are kept as written, to lay over what a handler declares.
    config.server = Profile::default();
    assert_eq!(config, Config::default());
}

#[test]
fn the_readme_reference_of_keys_without_defaults_is_valid_and_its_defaults_true() {
    let (_, others) = readme_reference();
    let config = parse(others, &[]).unwrap();
    let StoreConfig::Postgres(store) = &config.store else {
        panic!(
            "the reference shows the PostgreSQL store: {:?}",
            config.store
        )
    };
    assert_eq!(
        (store.pool_size, store.statement_timeout),
        (
            crate::store::PostgresConfig::DEFAULT_POOL_SIZE,
            crate::store::PostgresConfig::DEFAULT_STATEMENT_TIMEOUT
        )
    );
    let broker = config.broker.expect("the reference shows the broker");
    assert_eq!(
        (
            broker.group_start,
            broker.block,
            broker.claim_idle,
            broker.reclaim_interval
        ),
        (
            crate::broker::GroupStart::default(),
            BrokerConfig::DEFAULT_BLOCK,
            BrokerConfig::DEFAULT_CLAIM_IDLE,
            BrokerConfig::DEFAULT_RECLAIM_INTERVAL
        )
    );
    assert_eq!(config.health.enabled, Some(true));
    assert_eq!(config.isolation.memory_limit_mb, Some(512));
}

#[test]
fn the_kubernetes_config_map_is_a_valid_configuration() {
    let map = include_str!("../../../deploy/kubernetes/configmap.yaml");
    let (_, toml) = map
        .split_once("protean.toml: |\n")
        .expect("the ConfigMap holds protean.toml");
    let text: String = toml
        .lines()
        .map(|line| format!("{}\n", line.strip_prefix("    ").unwrap_or(line)))
        .collect();
    let env = [
        ("STORE_URI", "postgresql://app:secret@db:5432/shop"),
        ("REDIS_URI", "redis://cache:6379/0"),
    ];
    let config = parse(&text, &env).unwrap();
    assert_eq!(config.health.host, "0.0.0.0");
}

#[test]
fn the_production_example_is_a_valid_configuration() {
    let guide = include_str!("../../../docs/production.md");
    let example = guide
        .split_once("```toml\n")
        .and_then(|(_, rest)| rest.split_once("```"))
        .expect("docs/production.md has its example")
        .0;
    let env = [
        ("STORE_URI", "postgresql://app:secret@db:5432/shop"),
        ("REDIS_URI", "redis://cache:6379/0"),
    ];
    let config = parse(example, &env).unwrap();
    assert_eq!(config.isolation.mode, IsolationMode::Process);
    assert_eq!(config.shutdown_grace, Duration::from_secs(20));
}

#[test]
fn a_backoff_cap_below_its_first_delay_is_refused_whichever_layer_set_them() {
    let cases = [
        // The default cap (30 s) under a first delay of [server].
        (
            "[server]\nretry_delay_ms = 60000\n",
            "server.max_retry_delay_ms: 30000 is below retry_delay_ms 60000; raise it or lower retry_delay_ms",
        ),
        // A handler's cap under the first delay of [server]'s profile.
        (
            "[server]\nprofile = \"slow\"\n[profiles.slow]\nretry_delay_ms = 9000\n[server.handlers.x]\nmax_retry_delay_ms = 5000\n",
            "server.handlers.x.max_retry_delay_ms: 5000 is below retry_delay_ms 9000; raise it or lower retry_delay_ms",
        ),
        // Both in one profile.
        (
            "[profiles.p]\nretry_delay_ms = 10\nmax_retry_delay_ms = 5\n",
            "profiles.p.max_retry_delay_ms: 5 is below retry_delay_ms 10; raise it or lower retry_delay_ms",
        ),
        // The outbox's default cap (60 s) under its first delay.
        (
            "[outbox]\nretry_delay_ms = 120000\n",
            "outbox.max_retry_delay_ms: 60000 is below retry_delay_ms 120000; raise it or lower retry_delay_ms",
        ),
    ];
    for (text, expected) in cases {
        let error = parse(text, &[]).unwrap_err().to_string();
        assert_eq!(
            error,
            format!("config file protean.toml: {expected}"),
            "{text}"
        );
    }
    let raised = parse(
        "[server]\nretry_delay_ms = 60000\nmax_retry_delay_ms = 60000\n[outbox]\nretry_delay_ms = 120000\nmax_retry_delay_ms = 120000\n",
        &[],
    )
    .unwrap();
    let settings = raised.settings("x", &HandlerOptions::default());
    assert_eq!(
        (settings.retry_delay_ms, settings.max_retry_delay_ms),
        (60_000, 60_000)
    );
    assert_eq!(raised.outbox.max_retry_delay_ms, 120_000);
}

#[test]
fn a_file_that_cannot_be_read_is_one_line_with_the_fix() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nope.toml");
    let error = Config::load_file(&missing, &BTreeMap::new())
        .unwrap_err()
        .to_string();
    assert!(
        error.starts_with(&format!("cannot read config file {}: ", missing.display())),
        "{error}"
    );
    assert!(
        error.ends_with("; check the path (--config) and that this user may read it"),
        "{error}"
    );
    assert_eq!(error.lines().count(), 1, "{error}");
}
