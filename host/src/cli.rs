//! The command line, as a value. `main.rs` runs it and alone decides exit codes.

use std::path::PathBuf;

use clap::{error::ErrorKind, Args, CommandFactory, Parser, Subcommand, ValueEnum};

/// Runs the handlers of a Protean domain written in Rust.
///
/// Without a subcommand it runs the server: `protean-host --domain=target/debug/libshop.so`.
#[derive(Debug, Parser)]
#[command(name = "protean-host", version)]
pub(crate) struct Cli {
    #[command(flatten)]
    pub(crate) common: Common,
    #[command(flatten)]
    pub(crate) server: ServerArgs,
    #[command(subcommand)]
    pub(crate) command: Option<Command>,
}

impl Cli {
    /// The process's command line; a usage error exits 2 with clap's message.
    pub(crate) fn from_args() -> Self {
        Self::parse().checked().unwrap_or_else(|e| e.exit())
    }

    /// The server's flags before another subcommand are a usage error. (clap's
    /// `args_conflicts_with_subcommands` would say so, but it also refuses the global flags there:
    /// `protean-host --log-level warn dlq list`.)
    pub(crate) fn checked(self) -> Result<Self, clap::Error> {
        let server_flag = match (self.server.test_mode, self.server.reload) {
            (true, _) => Some("--test-mode"),
            (_, true) => Some("--reload"),
            _ => self.server.clock.map(|_| "--clock"),
        };
        match (server_flag, &self.command) {
            (Some(flag), Some(command)) if !matches!(command, Command::Server(_)) => {
                Err(Self::command().error(
                    ErrorKind::ArgumentConflict,
                    format!(
                        "{flag} runs the server; give it without a subcommand or after `server`"
                    ),
                ))
            }
            _ => Ok(self),
        }
    }
}

/// Options every subcommand takes.
#[derive(Debug, Args)]
pub(crate) struct Common {
    /// The domain library: PATH[:INSTANCE], a crate name (found in ., target/release, target/debug), or
    /// nothing for ./libdomain.so. PROTEAN_DOMAIN, when set, wins.
    #[arg(long, global = true, value_name = "LIB[:INSTANCE]")]
    pub(crate) domain: Option<String>,
    /// Log at DEBUG level, including the resolved configuration.
    #[arg(long, global = true)]
    pub(crate) debug: bool,
    /// The most verbose level logged (default info; --debug means debug).
    #[arg(long, global = true, value_enum, value_name = "LEVEL")]
    pub(crate) log_level: Option<LogLevel>,
    /// Human-readable lines, or one JSON object per line.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Console, value_name = "FORMAT")]
    pub(crate) log_format: LogFormat,
    /// The configuration file (default: ./protean.toml when it exists).
    #[arg(long, global = true, value_name = "FILE")]
    pub(crate) config: Option<PathBuf>,
}

/// Log levels, most severe first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum LogLevel {
    Error,
    Warn,
    Info,
    Debug,
    Trace,
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum LogFormat {
    Console,
    Json,
}

/// Options of the server.
#[derive(Debug, Clone, Default, Args)]
pub(crate) struct ServerArgs {
    /// Run until every subscription is idle, then exit 0 (exit 1 if the time limit passes first).
    #[arg(long)]
    pub(crate) test_mode: bool,
    /// Development: watch the domain library and switch to each new build of it (`cargo build`)
    /// between batches, without losing or doubling a message.
    #[arg(long, visible_alias = "watch", conflicts_with = "test_mode")]
    pub(crate) reload: bool,
    /// With --reload: the user (uid or name) whose library and directory may be loaded, besides root;
    /// default: the user running the host. Libraries writable by other users are always refused.
    #[arg(long, value_name = "UID|NAME", requires = "reload")]
    pub(crate) reload_owner: Option<String>,
    /// With --test-mode: `virtual` runs the flow on a clock that, whenever nothing else is left to
    /// do, jumps to the next due schedule or retry, so waits of days take milliseconds; it starts at
    /// the current time, or at TIME (RFC 3339) with `virtual@TIME`. Default: `system`.
    #[arg(long, value_name = "system|virtual[@TIME]", value_parser = parse_clock, requires = "test_mode")]
    pub(crate) clock: Option<ClockArg>,
    /// With --test-mode: after the summary, where each subscription's time went (reading, handler
    /// calls, their store reads, commits, idle ...): what to make faster.
    #[arg(long, requires = "test_mode")]
    pub(crate) timings: bool,
}

/// The clock a test-mode server runs on (`--clock`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ClockArg {
    System,
    /// Starting at the time given, or now.
    Virtual(Option<chrono::DateTime<chrono::Utc>>),
}

impl ClockArg {
    /// The engine's clock.
    pub(crate) fn clock(self) -> protean_host::clock::Clock {
        use protean_host::clock::Clock;
        match self {
            ClockArg::System => Clock::system(),
            ClockArg::Virtual(start) => Clock::simulated(start.unwrap_or_else(chrono::Utc::now)),
        }
    }
}

fn parse_clock(value: &str) -> Result<ClockArg, String> {
    match value.split_once('@') {
        None if value == "system" => Ok(ClockArg::System),
        None if value == "virtual" => Ok(ClockArg::Virtual(None)),
        Some(("virtual", time)) => chrono::DateTime::parse_from_rfc3339(time)
            .map(|t| ClockArg::Virtual(Some(t.to_utc())))
            .map_err(|e| {
                format!("{time:?} is not an RFC 3339 time ({e}); e.g. virtual@2026-01-01T00:00:00Z")
            }),
        _ => Err(format!(
            "{value:?} is not a clock: give system, virtual, or virtual@TIME (RFC 3339)"
        )),
    }
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub(crate) enum Command {
    /// Run the domain's handlers until stopped (the default).
    Server(ServerArgs),
    /// Show the domain's instances, handlers and the subscriptions the server would create.
    Inspect(InspectArgs),
    /// Append a command to its command stream and print its id.
    Send(SendArgs),
    /// Dead letters: list, inspect, replay to the group they failed in, purge.
    Dlq(DlqArgs),
    /// Subscriptions: where each stands (works without a running server).
    Subscriptions(SubscriptionsArgs),
    /// Ask a running server whether it is ready (/readyz): exit 0 if so, else 1 with one line saying why.
    Health(HealthArgs),
    /// The PostgreSQL store's schema: apply its migrations, or show where it stands.
    Db(DbArgs),
    /// The outbox: list the rows waiting to be published, publish held ones at once.
    Outbox(OutboxArgs),
    /// Scheduled messages: list, inspect, cancel (SQLite or PostgreSQL store).
    Schedules(SchedulesArgs),
    /// Create a domain crate to start from: one aggregate, command, event and handler, with a test.
    New(NewArgs),
    /// Internal: load a library copy and construct its instances in this throwaway process, reporting
    /// each step as a JSON line on stdout (see `plugin::probe`). The host runs it before it loads a build.
    #[command(name = "__probe", hide = true)]
    Probe(ProbeArgs),
    /// One worker process of isolated mode (`[server] isolation = "process"`): started by the server
    /// itself, never by hand.
    #[command(name = "__worker", hide = true)]
    Worker(WorkerArgs),
}

/// Options of the hidden worker subcommand.
#[derive(Debug, Args)]
pub(crate) struct WorkerArgs {
    /// The host process that started this worker.
    pub(crate) host_pid: u32,
}

/// Options of the hidden `__probe` subcommand.
#[derive(Debug, Args)]
pub(crate) struct ProbeArgs {
    /// The library file to load where it is (the host's private copy).
    #[arg(value_name = "LIBRARY")]
    pub(crate) library: PathBuf,
    /// The path to name in messages (the library the copy was made of); default: LIBRARY.
    #[arg(long, value_name = "PATH")]
    pub(crate) named: Option<PathBuf>,
    /// The instance to construct; default: the one the default rule selects.
    #[arg(long, value_name = "NAME")]
    pub(crate) instance: Option<String>,
    /// Construct every instance.
    #[arg(long, conflicts_with = "instance")]
    pub(crate) every: bool,
    /// The build id the host hashed the copy's bytes to (it wrote and read them back itself); default:
    /// read and hash LIBRARY here.
    #[arg(long, value_name = "ID")]
    pub(crate) build: Option<String>,
}

/// Options of `outbox`.
#[derive(Debug, Args)]
pub(crate) struct OutboxArgs {
    #[command(subcommand)]
    pub(crate) action: OutboxAction,
}

/// What to do with the outbox (SQLite or PostgreSQL, with a broker configured).
#[derive(Debug, Subcommand)]
pub(crate) enum OutboxAction {
    /// The rows waiting to be published, oldest first: target stream, seq, attempts, last error, age.
    List {
        /// Only the rows going to this broker stream (a category, e.g. shop::order).
        #[arg(long, value_name = "STREAM")]
        stream: Option<String>,
        /// At most this many rows.
        #[arg(long, default_value_t = 100)]
        limit: usize,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Clear the backoff of waiting rows, so that a running server publishes them at once (in order).
    #[command(group(clap::ArgGroup::new("which").required(true).args(["stream", "all"])))]
    Republish {
        /// The rows going to this broker stream.
        #[arg(long, value_name = "STREAM")]
        stream: Option<String>,
        /// Every waiting row.
        #[arg(long)]
        all: bool,
    },
}

/// Options of `schedules`.
#[derive(Debug, Args)]
pub(crate) struct SchedulesArgs {
    #[command(subcommand)]
    pub(crate) action: SchedulesAction,
}

/// What to do with scheduled messages.
#[derive(Debug, Subcommand)]
pub(crate) enum SchedulesAction {
    /// Schedules by due time: key, state, when due, target stream and message type; then how many
    /// are pending and overdue.
    List {
        /// Only the schedules in this state.
        #[arg(long, value_enum, value_name = "STATE")]
        state: Option<ScheduleStateArg>,
        /// At most this many schedules.
        #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..))]
        limit: u32,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Show one schedule in full: its message's data and metadata, when it is due, fired or cancelled.
    Inspect {
        /// The schedule's key.
        #[arg(value_name = "KEY")]
        key: String,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Cancel a pending schedule, so that its message is never appended. Exit 0 when it is cancelled
    /// (now or before), 1 when it already fired or there is none with the key.
    Cancel {
        /// The schedule's key.
        #[arg(value_name = "KEY")]
        key: String,
    },
}

/// A schedule's state, as `schedules list --state` takes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum ScheduleStateArg {
    Pending,
    Fired,
    Cancelled,
}

impl ScheduleStateArg {
    pub(crate) fn state(self) -> protean_host::store::ScheduleState {
        use protean_host::store::ScheduleState;
        match self {
            Self::Pending => ScheduleState::Pending,
            Self::Fired => ScheduleState::Fired,
            Self::Cancelled => ScheduleState::Cancelled,
        }
    }
}

/// Options of `subscriptions`.
#[derive(Debug, Args)]
pub(crate) struct SubscriptionsArgs {
    #[command(subcommand)]
    pub(crate) action: SubscriptionsAction,
}

/// What to show about subscriptions.
#[derive(Debug, Subcommand)]
pub(crate) enum SubscriptionsAction {
    /// For each subscription: type, categories, position or group, lag, pending, dead letters,
    /// consumers and state, read from the store and the broker.
    Status {
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
}

/// Options of `health`.
#[derive(Debug, Args)]
pub(crate) struct HealthArgs {
    /// The readiness endpoint (default: http://HOST:PORT/readyz from [server.health]).
    #[arg(long, value_name = "URL")]
    pub(crate) url: Option<String>,
    /// How long to wait for the answer, in milliseconds.
    #[arg(long, value_name = "MS", default_value_t = 5000)]
    pub(crate) timeout_ms: u64,
}

/// Options of `db`.
#[derive(Debug, Args)]
pub(crate) struct DbArgs {
    #[command(subcommand)]
    pub(crate) action: DbAction,
}

/// What `db` does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Subcommand)]
pub(crate) enum DbAction {
    /// Apply the pending migrations (idempotent; safe to run from several replicas at once).
    Setup,
    /// Print the schema version and the pending migrations.
    Status,
}

/// Options of `dlq`.
#[derive(Debug, Args)]
pub(crate) struct DlqArgs {
    #[command(subcommand)]
    pub(crate) action: DlqAction,
}

/// What to do with dead letters.
#[derive(Debug, Subcommand)]
pub(crate) enum DlqAction {
    /// List dead letters, of one subscription or of all.
    List {
        #[arg(long)]
        subscription: Option<String>,
        /// At most this many per subscription.
        #[arg(long, default_value_t = 100)]
        limit: usize,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Show one dead letter in full.
    Inspect {
        id: String,
        #[arg(long)]
        subscription: String,
    },
    /// Send one dead letter back to the subscription it failed in (not to every group).
    Replay {
        id: String,
        #[arg(long)]
        subscription: String,
    },
    /// Send every dead letter of a subscription back to it.
    ReplayAll {
        #[arg(long)]
        subscription: String,
        /// Confirm the bulk action.
        #[arg(long, short)]
        yes: bool,
    },
    /// Delete every dead letter of a subscription.
    Purge {
        #[arg(long)]
        subscription: String,
        /// Confirm the bulk action.
        #[arg(long, short)]
        yes: bool,
    },
}

/// Options of `send`.
#[derive(Debug, Args)]
pub(crate) struct SendArgs {
    /// The command's type, e.g. Fulfilment.PlaceOrder.v1.
    #[arg(value_name = "TYPE")]
    pub(crate) message_type: String,
    /// The command's data as a JSON object, or - to read one JSON object per line from stdin.
    #[arg(value_name = "JSON")]
    pub(crate) data: String,
    /// When the command expires (RFC 3339 time); an expired command is acknowledged without a call.
    #[arg(long, value_name = "TIME")]
    pub(crate) deadline: Option<String>,
    /// Store the command at most once for KEY (Protean's metadata.headers.idempotency_key): a send
    /// with the key of a command already stored stores nothing and answers that command's id.
    /// Generated when absent; with `-`, stdin line N uses KEY:N.
    #[arg(long, value_name = "KEY")]
    pub(crate) idempotency_key: Option<String>,
}

/// Options of `new`.
#[derive(Debug, Args)]
pub(crate) struct NewArgs {
    /// The crate's name (`shop`); the domain is named after it (`Shop`).
    #[arg(value_name = "NAME")]
    pub(crate) name: String,
    /// Where to create it (default: ./NAME); must not exist.
    #[arg(long, value_name = "DIR")]
    pub(crate) path: Option<PathBuf>,
    /// The plugin-api crate to depend on (default: the one of the source tree this binary was built
    /// from).
    #[arg(long, value_name = "PATH")]
    pub(crate) plugin_api: Option<PathBuf>,
}

/// Options of `inspect`.
#[derive(Debug, Args)]
pub(crate) struct InspectArgs {
    /// Print JSON instead of text.
    #[arg(long)]
    pub(crate) json: bool,
}

impl Common {
    /// The logging flags, as given to a child process of this binary so that it logs the same way.
    pub(crate) fn log_args(&self) -> Vec<String> {
        let name = |value: Option<clap::builder::PossibleValue>| {
            value.map_or_else(String::new, |v| v.get_name().to_owned())
        };
        vec![
            "--log-level".into(),
            name(self.level().to_possible_value()),
            "--log-format".into(),
            name(self.log_format.to_possible_value()),
        ]
    }

    /// The effective log level.
    pub(crate) fn level(&self) -> LogLevel {
        match (self.log_level, self.debug) {
            (Some(level), _) => level,
            (None, true) => LogLevel::Debug,
            (None, false) => LogLevel::Info,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("protean-host").chain(args.iter().copied()))
            .and_then(Cli::checked)
    }

    #[test]
    fn the_worker_subcommand_is_the_one_the_host_starts_and_is_hidden() {
        let host = "4242";
        let cli = parse(&[protean_host::plugin::isolated::SUBCOMMAND, host]).unwrap();
        assert!(matches!(
            cli.command,
            Some(Command::Worker(WorkerArgs { host_pid: 4242 }))
        ));
        let help = Cli::command().render_long_help().to_string();
        assert!(!help.contains("__worker"), "{help}");
    }

    #[test]
    fn bare_flags_run_the_server() {
        let cli = parse(&["--domain", "libx.so", "--test-mode"]).unwrap();
        assert!(cli.command.is_none());
        assert!(cli.server.test_mode);
        assert_eq!(cli.common.domain.as_deref(), Some("libx.so"));
    }

    #[test]
    fn subcommands_take_global_flags_after_them() {
        let cli = parse(&["inspect", "--json", "--domain=x", "--debug"]).unwrap();
        assert!(matches!(
            cli.command,
            Some(Command::Inspect(InspectArgs { json: true }))
        ));
        assert_eq!(cli.common.level(), LogLevel::Debug);
        let cli = parse(&["server", "--test-mode", "--log-format", "json"]).unwrap();
        assert!(matches!(
            cli.command,
            Some(Command::Server(ServerArgs {
                test_mode: true,
                reload: false,
                reload_owner: None,
                clock: None,
                timings: false,
            }))
        ));
        assert_eq!(cli.common.log_format, LogFormat::Json);
    }

    #[test]
    fn new_takes_a_name_and_optionally_where_and_which_plugin_api() {
        let Some(Command::New(args)) = parse(&["new", "shop"]).unwrap().command else {
            panic!("`new shop` is the new subcommand");
        };
        assert_eq!(
            (args.name.as_str(), args.path, args.plugin_api),
            ("shop", None, None)
        );
        let cli = parse(&["new", "shop", "--path", "d", "--plugin-api", "api"]).unwrap();
        let Some(Command::New(args)) = cli.command else {
            panic!("`new shop --path d` is the new subcommand");
        };
        assert_eq!(args.path, Some(PathBuf::from("d")));
        assert_eq!(args.plugin_api, Some(PathBuf::from("api")));
        assert!(parse(&["new"]).is_err(), "a name is required");
    }

    #[test]
    fn global_flags_go_before_a_subcommand_too() {
        let cli = parse(&["--log-level", "warn", "--domain", "x", "dlq", "list"]).unwrap();
        assert!(matches!(cli.command, Some(Command::Dlq(_))));
        assert_eq!(cli.common.level(), LogLevel::Warn);
        assert_eq!(cli.common.domain.as_deref(), Some("x"));
        let cli = parse(&["--test-mode", "server"]).unwrap();
        assert!(
            cli.server.test_mode,
            "the server's flags before `server` are the server's"
        );
    }

    #[test]
    fn the_clock_is_system_or_virtual_from_now_or_a_time_and_only_in_test_mode() {
        let clock = |args: &[&str]| parse(args).map(|cli| cli.server.clock);
        assert_eq!(clock(&["--test-mode"]).unwrap(), None);
        assert_eq!(
            clock(&["--test-mode", "--clock", "virtual"]).unwrap(),
            Some(ClockArg::Virtual(None))
        );
        let start = chrono::DateTime::parse_from_rfc3339("2026-01-01T00:00:00Z").unwrap();
        assert_eq!(
            clock(&["--test-mode", "--clock=virtual@2026-01-01T00:00:00Z"]).unwrap(),
            Some(ClockArg::Virtual(Some(start.to_utc())))
        );
        assert_eq!(
            clock(&["--test-mode", "--clock", "system"]).unwrap(),
            Some(ClockArg::System)
        );
        for bad in [
            &["--clock", "virtual"][..],
            &["--timings"],
            &["--test-mode", "--clock", "fast"],
            &["--test-mode", "--clock", "virtual@tomorrow"],
        ] {
            let error = parse(bad).unwrap_err();
            assert_eq!(error.exit_code(), 2, "{bad:?}: {error}");
        }
        let error = parse(&["--test-mode", "--clock", "fast"]).unwrap_err();
        assert!(
            error
                .to_string()
                .contains("give system, virtual, or virtual@TIME"),
            "{error}"
        );
    }

    #[test]
    fn bad_values_are_usage_errors() {
        for args in [
            &["--log-level", "loud"][..],
            &["--log-format", "xml"],
            &["--nope"],
            &["inspect", "--test-mode"],
            &["--test-mode", "inspect"],
            &["--reload", "dlq", "list"],
        ] {
            let error = parse(args).unwrap_err();
            assert_eq!(error.exit_code(), 2, "{args:?}: {error}");
        }
    }

    #[test]
    fn send_takes_a_type_and_json() {
        let cli = parse(&[
            "send",
            "Shop.Place.v1",
            "{}",
            "--deadline",
            "2030-01-01T00:00:00Z",
            "--idempotency-key",
            "order-1",
        ])
        .unwrap();
        let Some(Command::Send(send)) = cli.command else {
            panic!("not send")
        };
        assert_eq!(
            (send.message_type.as_str(), send.data.as_str()),
            ("Shop.Place.v1", "{}")
        );
        assert_eq!(send.idempotency_key.as_deref(), Some("order-1"));
        assert_eq!(
            parse(&["send", "Shop.Place.v1"]).unwrap_err().exit_code(),
            2
        );
    }

    #[test]
    fn subscriptions_status_and_health_parse() {
        let cli = parse(&["subscriptions", "status", "--json"]).unwrap();
        assert!(matches!(
            cli.command,
            Some(Command::Subscriptions(SubscriptionsArgs {
                action: SubscriptionsAction::Status { json: true }
            }))
        ));
        let cli = parse(&["health", "--url", "http://127.0.0.1:9/readyz"]).unwrap();
        let Some(Command::Health(health)) = cli.command else {
            panic!("not health")
        };
        assert_eq!(health.url.as_deref(), Some("http://127.0.0.1:9/readyz"));
        assert_eq!(parse(&["subscriptions"]).unwrap_err().exit_code(), 2);
        assert_eq!(
            parse(&["health", "--timeout-ms", "soon"])
                .unwrap_err()
                .exit_code(),
            2
        );
    }

    #[test]
    fn outbox_republish_needs_a_stream_or_all() {
        let cli = parse(&["outbox", "republish", "--stream", "shop::order"]).unwrap();
        assert!(matches!(
            cli.command,
            Some(Command::Outbox(OutboxArgs {
                action: OutboxAction::Republish { all: false, .. }
            }))
        ));
        assert!(parse(&["outbox", "list", "--json"]).is_ok());
        for args in [
            &["outbox", "republish"][..],
            &["outbox", "republish", "--all", "--stream", "x"],
        ] {
            assert_eq!(parse(args).unwrap_err().exit_code(), 2, "{args:?}");
        }
    }

    #[test]
    fn schedules_list_inspect_and_cancel_parse() {
        let cli = parse(&[
            "schedules",
            "list",
            "--state",
            "fired",
            "--limit",
            "5",
            "--json",
        ])
        .unwrap();
        assert!(matches!(
            cli.command,
            Some(Command::Schedules(SchedulesArgs {
                action: SchedulesAction::List {
                    state: Some(ScheduleStateArg::Fired),
                    limit: 5,
                    json: true
                }
            }))
        ));
        let cli = parse(&["schedules", "list"]).unwrap();
        assert!(matches!(
            cli.command,
            Some(Command::Schedules(SchedulesArgs {
                action: SchedulesAction::List {
                    state: None,
                    limit: 100,
                    json: false
                }
            }))
        ));
        let Some(Command::Schedules(SchedulesArgs {
            action: SchedulesAction::Inspect { key, json: true },
        })) = parse(&["schedules", "inspect", "order-1:remind", "--json"])
            .unwrap()
            .command
        else {
            panic!("not schedules inspect")
        };
        assert_eq!(key, "order-1:remind");
        let Some(Command::Schedules(SchedulesArgs {
            action: SchedulesAction::Cancel { key },
        })) = parse(&["schedules", "cancel", "order-1:remind"])
            .unwrap()
            .command
        else {
            panic!("not schedules cancel")
        };
        assert_eq!(key, "order-1:remind");
    }

    #[test]
    fn bad_schedules_input_is_a_usage_error() {
        for args in [
            &["schedules"][..],
            &["schedules", "list", "--state", "late"],
            &["schedules", "list", "--limit", "0"],
            &["schedules", "list", "--limit", "-1"],
            &["schedules", "inspect"],
            &["schedules", "cancel"],
            &["schedules", "cancel", "a", "b"],
        ] {
            let error = parse(args).unwrap_err();
            assert_eq!(error.exit_code(), 2, "{args:?}: {error}");
        }
        let error = parse(&["schedules", "list", "--state", "late"]).unwrap_err();
        assert!(
            error
                .to_string()
                .contains("[possible values: pending, fired, cancelled]"),
            "{error}"
        );
    }

    #[test]
    fn the_logging_flags_given_to_a_child_parse_back_to_the_same_levels() {
        let cli = parse(&["--debug", "--log-format", "json", "inspect"]).unwrap();
        let mut args = cli.common.log_args();
        args.extend(["__probe", "lib.so", "--every", "--build", "0a1b2c"].map(String::from));
        let child = parse(&args.iter().map(String::as_str).collect::<Vec<_>>()).unwrap();
        assert_eq!(child.common.level(), LogLevel::Debug);
        assert_eq!(child.common.log_format, LogFormat::Json);
        let Some(Command::Probe(probe)) = child.command else {
            panic!("not the probe")
        };
        assert!(probe.every && probe.instance.is_none());
        assert_eq!(probe.build.as_deref(), Some("0a1b2c"));
        assert_eq!(
            parse(&["__probe", "lib.so", "--every", "--instance", "x"])
                .unwrap_err()
                .exit_code(),
            2
        );
    }

    #[test]
    fn log_level_wins_over_debug() {
        let cli = parse(&["--debug", "--log-level", "warn"]).unwrap();
        assert_eq!(cli.common.level(), LogLevel::Warn);
    }
}
