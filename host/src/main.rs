//! The `protean-host` binary: parses the command line, runs it, and maps the outcome to an exit code
//! (0 success, 1 failure, 2 usage error; `send` adds 3: the command's outcome is unknown, and 65: a
//! command over `server.max_message_bytes` was refused).

use std::{io::BufRead, process::ExitCode};

// The command line and what only it needs live in the binary, not in the library embedders link.
mod allocator;
mod cli;
mod discovery;
mod logging;

use anyhow::Context as _;
use cli::{
    Cli, ClockArg, Command, Common, DbAction, DbArgs, DlqAction, DlqArgs, HealthArgs, InspectArgs,
    LogFormat, LogLevel, NewArgs, OutboxAction, OutboxArgs, ProbeArgs, SchedulesAction,
    SchedulesArgs, SendArgs, ServerArgs, SubscriptionsAction, SubscriptionsArgs,
};
use protean_host::{
    clock::Clock,
    config::{Config, IsolationMode},
    engine::{
        timings::{Phase, Spent},
        Engine, EngineError, EngineOptions, Outcome, RunReport, Sent, SEND_FIX,
    },
    inspect,
    message::TooBig,
    ops,
    plugin::{isolated, probe, Instances, Isolation, Library, Plugin, Probe},
    reload, store, template,
};

fn main() -> ExitCode {
    let cli = Cli::from_args();
    logging::init(cli.common.level(), cli.common.log_format);
    let format = cli.common.log_format;
    match run(cli) {
        Ok(code) => code,
        Err(error) => {
            // One line, where the operator looks: the JSON log stream when there is one, else stderr.
            match format {
                LogFormat::Json => tracing::error!("{error:#}"),
                LogFormat::Console => eprintln!("error: {error:#}"),
            }
            if error.downcast_ref::<TooBig>().is_some() {
                ExitCode::from(DATA_ERROR)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        None => server(&cli.common, &cli.server),
        Some(Command::Server(args)) => server(&cli.common, &args),
        Some(Command::Inspect(args)) => inspect(&cli.common, &args),
        Some(Command::Send(args)) => send(&cli.common, &args),
        Some(Command::Dlq(args)) => dlq(&cli.common, &args),
        Some(Command::Subscriptions(args)) => subscriptions(&cli.common, &args),
        Some(Command::Health(args)) => health(&cli.common, &args),
        Some(Command::Db(args)) => db(&cli.common, &args),
        Some(Command::Outbox(args)) => outbox(&cli.common, &args),
        Some(Command::Schedules(args)) => schedules(&cli.common, &args),
        Some(Command::New(args)) => new_crate(&args),
        Some(Command::Probe(args)) => probe_child(&cli.common, &args),
        Some(Command::Worker(args)) => {
            isolated::worker::serve(args.host_pid)?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// `new`: create the crate and print how to test and run it.
fn new_crate(args: &NewArgs) -> anyhow::Result<ExitCode> {
    let dir = args
        .path
        .clone()
        .unwrap_or_else(|| args.name.clone().into());
    let plugin_api = args
        .plugin_api
        .clone()
        .unwrap_or_else(template::default_plugin_api);
    let created = template::create(&dir, &args.name, &plugin_api)?;
    println!("{}", created.next_steps());
    Ok(ExitCode::SUCCESS)
}

/// How this binary probes a build before loading it: by running itself (`__probe`), logging as this
/// process does, and showing the child's own output at debug level.
fn prober(common: &Common, config: &Config) -> Probe {
    Probe::this_binary(config.probe_timeout)
        .args(common.log_args())
        .show_output(matches!(common.level(), LogLevel::Debug | LogLevel::Trace))
}

/// The hidden `__probe` subcommand: never returns (the process ends when the probe does).
fn probe_child(common: &Common, args: &ProbeArgs) -> ! {
    let instances = if args.every {
        Instances::Every
    } else {
        Instances::Selected(args.instance.as_deref())
    };
    let named = args.named.as_deref().unwrap_or(&args.library);
    probe::child(
        &args.library,
        named,
        args.build.as_deref(),
        instances,
        common.level().plugin_level(),
    )
}

fn domain_spec(common: &Common) -> anyhow::Result<discovery::DomainSpec> {
    let env = std::env::var("PROTEAN_DOMAIN").ok();
    let cwd = std::env::current_dir().context("cannot read the working directory")?;
    Ok(discovery::resolve(
        env.as_deref(),
        common.domain.as_deref(),
        &cwd,
    )?)
}

/// The domain instance to run, where the configuration says, and what a reload needs to load the
/// next build of it. With `reload`, the library must pass the reload trust check before anything of
/// it is loaded. The build is probed first (in a child process), in either mode, so one that crashes
/// or hangs while it loads is one error line and exit code 1, not a raw abort of this process.
fn load_plugin(
    common: &Common,
    config: &Config,
    reload: Option<&ServerArgs>,
) -> anyhow::Result<(Plugin, reload::Target)> {
    let spec = domain_spec(common)?;
    let owner = match reload.and_then(|args| args.reload_owner.as_deref()) {
        Some(owner) => protean_host::plugin::trust::resolve_owner(owner)?,
        None => protean_host::plugin::trust::euid(),
    };
    if reload.is_some() {
        reload::check_trusted(&spec.path, owner)?;
    }
    let isolation = isolation(config)?;
    let probe = prober(common, config);
    let bytes = protean_host::plugin::read(&spec.path)?;
    let level = common.level().plugin_level();
    let plugin = protean_host::plugin::start(
        &spec.path,
        &bytes,
        spec.instance.as_deref(),
        level,
        &isolation,
        Some(&probe),
    )?;
    let instance = plugin.name().to_owned();
    let probe_ms = plugin.probed_in().map(|t| t.as_millis() as u64);
    tracing::info!(library = %spec.path.display(), instance, build = plugin.build_id(), handlers = plugin.registrations().len(), isolated = plugin.isolated(), probe_ms, "domain loaded");
    let target = reload::Target {
        library: spec.path,
        instance,
        log_level: level,
        owner,
        isolation,
        probe: Some(probe),
    };
    Ok((plugin, target))
}

/// Where the configuration runs the domain: here, or in worker processes of this very binary.
fn isolation(config: &Config) -> anyhow::Result<Isolation> {
    Ok(match config.isolation.mode {
        IsolationMode::None => Isolation::InProcess,
        IsolationMode::Process => Isolation::Process(
            isolated::Settings::from_config(config)
                .context("cannot find this program's file to start worker processes from")?,
        ),
    })
}

fn engine(
    common: &Common,
    test_mode: bool,
    clock: Clock,
) -> anyhow::Result<(Engine, reload::Target)> {
    let config = Config::load(common.config.as_deref())?;
    tracing::debug!(config = %serde_json::to_string(&config).unwrap_or_default(), "resolved configuration");
    let (plugin, target) = load_plugin(common, &config, None)?;
    Ok((
        Engine::new(
            plugin,
            EngineOptions {
                test_mode,
                config,
                clock,
            },
        )?,
        target,
    ))
}

/// The server outside test mode: the configuration and plugin are checked first (a mistake there fails
/// at once), then the store and broker are waited for. `None` when a signal stopped the wait.
fn waiting_engine(
    common: &Common,
    args: &ServerArgs,
) -> anyhow::Result<Option<(Engine, reload::Target)>> {
    let config = Config::load(common.config.as_deref())?;
    tracing::debug!(config = %serde_json::to_string(&config).unwrap_or_default(), "resolved configuration");
    let (plugin, target) = load_plugin(common, &config, args.reload.then_some(args))?;
    if !protean_host::engine::startup::wait_for_dependencies(&config)? {
        return Ok(None);
    }
    let options = EngineOptions {
        test_mode: false,
        config,
        ..EngineOptions::default()
    };
    Ok(Some((Engine::new(plugin, options)?, target)))
}

fn inspect(common: &Common, args: &InspectArgs) -> anyhow::Result<ExitCode> {
    let spec = domain_spec(common)?;
    let config = Config::load(common.config.as_deref())?;
    // Probed with the instances inspect constructs: the named one, or all of them.
    let instances = match spec.instance.as_deref() {
        Some(name) => Instances::Selected(Some(name)),
        None => Instances::Every,
    };
    let library = Library::load_probed(&spec.path, &prober(common, &config), instances)?;
    let report = inspect::describe(
        &library,
        spec.instance.as_deref(),
        common.level().plugin_level(),
    )?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{report}");
    }
    Ok(if report.failed() {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

fn server(common: &Common, args: &ServerArgs) -> anyhow::Result<ExitCode> {
    let (engine, target) = if args.test_mode {
        engine(
            common,
            true,
            args.clock.map_or(Clock::system(), ClockArg::clock),
        )?
    } else {
        match waiting_engine(common, args)? {
            Some(started) => started,
            None => return Ok(ExitCode::SUCCESS),
        }
    };
    let engine = std::sync::Arc::new(engine);
    // Kept alive for the whole run: dropping it stops the watch.
    let _watcher = args
        .reload
        .then(|| reload::watch(engine.clone(), target))
        .transpose()?;
    let report = engine.run()?;
    if args.test_mode {
        print_summary(&report);
        if args.timings {
            print_timings(&report.timings);
        }
    }
    Ok(ExitCode::from(report.exit_code()))
}

/// What a test-mode run did, on stdout.
fn print_summary(report: &RunReport) {
    let outcome = match &report.outcome {
        Outcome::Quiescent => "completed: every subscription is caught up".to_owned(),
        Outcome::NothingToRun => "nothing to run: the domain has no handlers".to_owned(),
        Outcome::Signal(signal) => format!("stopped by {signal}"),
        Outcome::TimedOut { busy } => format!("timed out; still busy: {}", busy.join(", ")),
    };
    let mut elapsed = format!("{} ms", report.elapsed.as_millis());
    if let Some(simulated) = report.virtual_elapsed {
        elapsed.push_str(&format!("; virtual clock moved {}", humanize(simulated)));
    }
    println!("test mode {outcome} ({elapsed})");
    for (title, counts) in [
        ("handled", &report.totals.handled),
        ("written", &report.totals.written),
    ] {
        for (message_type, count) in counts {
            println!("  {title:<8} {count:>7}  {message_type}");
        }
    }
    println!(
        "  dead-lettered {}, retries {}",
        report.totals.dead_lettered, report.totals.retries
    );
}

/// Where each subscription's time went, on stdout: a line per subscription with its busiest phases
/// first, each in ms and as a share of the subscription's time (workers of one subscription add up).
fn print_timings(timings: &std::collections::BTreeMap<String, Spent>) {
    println!("time by subscription (ms, share):");
    for (subscription, spent) in timings {
        let total = spent.total().as_secs_f64().max(f64::EPSILON);
        let mut phases: Vec<Phase> = Phase::ALL
            .into_iter()
            .filter(|p| !spent.get(*p).is_zero())
            .collect();
        phases.sort_by_key(|p| std::cmp::Reverse(spent.get(*p)));
        let parts: Vec<String> = phases
            .iter()
            .map(|p| {
                let time = spent.get(*p).as_secs_f64();
                format!(
                    "{} {:.0} ({:.0}%)",
                    p.name(),
                    time * 1e3,
                    100.0 * time / total
                )
            })
            .collect();
        println!("  {subscription}: {}", parts.join(", "));
    }
}

/// A duration as a person reads it: `3d 0h 15m 2.5s`, with only the units it needs.
fn humanize(d: std::time::Duration) -> String {
    let ms = d.as_millis() as u64;
    let (days, hours, minutes) = (ms / 86_400_000, ms / 3_600_000 % 24, ms / 60_000 % 60);
    let seconds = (ms % 60_000) as f64 / 1000.0;
    let mut parts = Vec::new();
    for (n, unit) in [(days, "d"), (hours, "h"), (minutes, "m")] {
        if n > 0 || !parts.is_empty() {
            parts.push(format!("{n}{unit}"));
        }
    }
    parts.push(format!("{seconds}s"));
    parts.join(" ")
}

/// `send`'s exit code when a command's outcome is unknown: it may or may not be stored.
const OUTCOME_UNKNOWN: u8 = 3;

/// `send`'s exit code when a command is refused for its size (sysexits' EX_DATAERR): nothing of it was
/// stored, and sending it again will not help.
const DATA_ERROR: u8 = 65;

/// The longest idempotency key accepted, in bytes (keys are stored and indexed).
const MAX_KEY_BYTES: usize = 200;

/// `send`: exit 0 when every command is stored (now, or before under the same idempotency key), 1 when
/// one is not (with why; the lines after it are not sent), 3 when one's outcome is unknown (with the
/// command that retries it safely).
fn send(common: &Common, args: &SendArgs) -> anyhow::Result<ExitCode> {
    if let Some(key) = &args.idempotency_key {
        check_key(key)?;
    }
    if let Some(deadline) = &args.deadline {
        protean_host::message::parse_time(deadline).with_context(|| {
            format!("--deadline {deadline:?} is not an RFC 3339 time like 2030-01-31T12:00:00Z")
        })?;
    }
    let (engine, _) = engine(common, false, Clock::system())?;
    let limit = engine.config().max_message_bytes;
    let sender = Sender {
        engine: &engine,
        common,
        args,
    };
    if args.data != "-" {
        let key = args.idempotency_key.clone().unwrap_or_else(new_key);
        return sender.send(&args.data, &key, None);
    }
    let mut input = std::io::stdin().lock();
    for n in 0.. {
        let line = match read_line(&mut input, limit).context("cannot read stdin")? {
            None => break,
            Some(Line::Text(line)) => line,
            Some(Line::TooLong(size)) => {
                return Err(data_too_big(size, limit)).context(format!("stdin line {}", n + 1))
            }
        };
        if line.trim().is_empty() {
            continue;
        }
        let key = match &args.idempotency_key {
            Some(key) => format!("{key}:{}", n + 1),
            None => new_key(),
        };
        check_key(&key)?;
        let code = sender.send(&line, &key, Some(n + 1))?;
        if code != ExitCode::SUCCESS {
            eprintln!("the lines after stdin line {} were not sent", n + 1);
            return Ok(code);
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// A line of `send`'s stdin.
enum Line {
    /// Without its line ending.
    Text(String),
    /// A line longer than the limit, by its length: skipped unread rather than held in memory.
    TooLong(usize),
}

/// The next line of `input`; `None` at the end.
fn read_line(input: &mut impl BufRead, limit: usize) -> std::io::Result<Option<Line>> {
    use std::io::Read;
    let mut bytes = Vec::new();
    // The limit, and room for a line ending ("\r\n") that does not count.
    let room = limit + 2;
    let read = input
        .by_ref()
        .take(room as u64)
        .read_until(b'\n', &mut bytes)?;
    if read == 0 {
        return Ok(None);
    }
    if bytes.ends_with(b"\n") || read < room {
        for ending in [b'\n', b'\r'] {
            if bytes.last() == Some(&ending) {
                bytes.pop();
            }
        }
        let text = String::from_utf8(bytes).map_err(|_| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "stream did not contain valid UTF-8",
            )
        })?;
        return Ok(Some(Line::Text(text)));
    }
    let mut length = bytes.len();
    loop {
        let chunk = input.fill_buf()?;
        if chunk.is_empty() {
            break;
        }
        match chunk.iter().position(|b| *b == b'\n') {
            Some(end) => {
                length += end;
                input.consume(end + 1);
                break;
            }
            None => {
                let n = chunk.len();
                length += n;
                input.consume(n);
            }
        }
    }
    Ok(Some(Line::TooLong(length)))
}

/// `send`'s command data of `size` bytes is over `limit`.
fn data_too_big(size: usize, limit: usize) -> TooBig {
    TooBig {
        what: "the command data".into(),
        size,
        limit,
        fix: SEND_FIX,
    }
}

fn new_key() -> String {
    uuid::Uuid::new_v4().to_string()
}

fn check_key(key: &str) -> anyhow::Result<()> {
    anyhow::ensure!(
        !key.is_empty(),
        "--idempotency-key is empty; pass a key, or leave the option out to have one generated"
    );
    anyhow::ensure!(
        key.len() <= MAX_KEY_BYTES,
        "--idempotency-key is {} bytes long; at most {MAX_KEY_BYTES} are allowed",
        key.len()
    );
    anyhow::ensure!(
        !key.chars().any(char::is_control),
        "--idempotency-key contains a control character"
    );
    Ok(())
}

/// Sends `send`'s commands one at a time and says what became of each.
struct Sender<'a> {
    engine: &'a Engine,
    common: &'a Common,
    args: &'a SendArgs,
}

impl Sender<'_> {
    /// Send one command (`line`: its stdin line) under `key`; prints its id on stdout when stored.
    fn send(&self, text: &str, key: &str, line: Option<usize>) -> anyhow::Result<ExitCode> {
        let at = line
            .map(|n| format!(" (stdin line {n})"))
            .unwrap_or_default();
        let limit = self.engine.config().max_message_bytes;
        let refused = |too_big: TooBig| match line {
            Some(n) => anyhow::Error::new(too_big).context(format!("stdin line {n}")),
            None => anyhow::Error::new(too_big),
        };
        // Refused before it is decoded: a decoded tree takes many times the text. Data over the limit
        // is refused even if the whitespace it holds would not have been stored.
        if text.len() > limit {
            return Err(refused(data_too_big(text.len(), limit)));
        }
        let data: serde_json::Value = serde_json::from_str(text).with_context(|| {
            format!("the command data{at} is not JSON; pass an object like '{{\"id\": \"1\"}}'")
        })?;
        let deadline = self.args.deadline.as_deref();
        let send = || {
            self.engine
                .send_once(&self.args.message_type, &data, deadline, key)
        };
        let mut sent = send();
        if matches!(&sent, Err(EngineError::Store(error)) if error.is_timed_out()) {
            // A lock held by a frozen process's transaction, which the store ends after the same
            // timeout: by the end of a second wait it is gone. The key keeps the command at most once.
            eprintln!("the store timed out{at}; trying once more (idempotency key {key})");
            sent = send();
        }
        match sent {
            Ok(Sent::Committed(id)) => println!("{id}"),
            Ok(Sent::AlreadyCommitted(id)) => {
                println!("{id}");
                eprintln!("already committed{at}: idempotency key {key} was stored before as command {id}; nothing new was stored");
            }
            Err(EngineError::Store(error @ store::Error::OutcomeUnknown { .. })) => {
                return Ok(self.unknown(text, key, &at, &error));
            }
            Err(EngineError::TooBig(too_big)) => return Err(refused(too_big)),
            Err(error) => {
                return Err(anyhow::Error::new(error)
                    .context(format!("command{at} not committed (idempotency key {key})")))
            }
        }
        Ok(ExitCode::SUCCESS)
    }

    /// The commit's answer was lost. The key says whether it landed, if the store answers now;
    /// otherwise only a retry with the same key can settle it, and it is safe.
    fn unknown(&self, text: &str, key: &str, at: &str, error: &store::Error) -> ExitCode {
        if let Ok(Some(id)) = self.engine.store().idempotency_key(key) {
            println!("{id}");
            eprintln!("committed{at}: the connection failed while committing, but the store has idempotency key {key} as command {id}");
            return ExitCode::SUCCESS;
        }
        eprintln!("outcome unknown{at}: {error}; the command may or may not be stored (idempotency key {key})");
        eprintln!(
            "retry safely (it stores the command at most once): {}",
            self.retry_command(text, key)
        );
        ExitCode::from(OUTCOME_UNKNOWN)
    }

    /// The command line that sends this command again under `key`, quoted for a POSIX shell.
    fn retry_command(&self, text: &str, key: &str) -> String {
        let program = std::env::args()
            .next()
            .unwrap_or_else(|| "protean-host".into());
        // Global options go after the subcommand: before it they would select the server.
        let mut words = vec![program, "send".into()];
        if let Some(config) = &self.common.config {
            words.extend(["--config".into(), config.display().to_string()]);
        }
        if let Some(domain) = &self.common.domain {
            words.extend(["--domain".into(), domain.clone()]);
        }
        words.extend(["--idempotency-key".into(), key.into()]);
        if let Some(deadline) = &self.args.deadline {
            words.extend(["--deadline".into(), deadline.clone()]);
        }
        words.extend([self.args.message_type.clone(), text.to_owned()]);
        words
            .iter()
            .map(|w| shell_quote(w))
            .collect::<Vec<_>>()
            .join(" ")
    }
}

/// `word` as one POSIX shell word: bare when it is plainly safe, else in single quotes.
fn shell_quote(word: &str) -> String {
    let plain = !word.is_empty()
        && word
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./:=@,+".contains(c));
    if plain {
        word.to_owned()
    } else {
        format!("'{}'", word.replace('\'', r"'\''"))
    }
}

/// `db setup` and `db status`: the PostgreSQL store's migrations. Needs no domain, only the config.
fn db(common: &Common, args: &DbArgs) -> anyhow::Result<ExitCode> {
    use protean_host::store::{postgres::migrate, PostgresStore, StoreConfig};
    let config = Config::load(common.config.as_deref())?;
    let StoreConfig::Postgres(pg) = &config.store else {
        anyhow::bail!("the configured store is not PostgreSQL; only [store] provider = \"postgres\" has migrations (SQLite creates its schema itself)");
    };
    let store = PostgresStore::connect(pg)?;
    match args.action {
        DbAction::Setup => {
            let applied = store.setup()?;
            for m in &applied {
                println!("applied migration {}: {}", m.version, m.name);
            }
            println!(
                "schema version {} ({}; {} migration(s) applied now)",
                migrate::latest(),
                pg.label(),
                applied.len()
            );
        }
        DbAction::Status => {
            let status = store.status()?;
            println!(
                "schema version {} of {} ({})",
                status.version,
                migrate::latest(),
                pg.label()
            );
            for m in &status.pending {
                println!("pending migration {}: {}", m.version, m.name);
            }
            if !status.is_current() {
                println!("run `protean-host db setup` to apply them");
                // Scripts and init containers can ask "is the schema current?" by the exit code.
                return Ok(ExitCode::FAILURE);
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `outbox list` and `outbox republish`: read and nudge the store's outbox. Needs no domain, only the
/// config; a running server publishes what `republish` cleared on its next round.
fn outbox(common: &Common, args: &OutboxArgs) -> anyhow::Result<ExitCode> {
    use protean_host::store::{self, StoreConfig};
    let config = Config::load(common.config.as_deref())?;
    anyhow::ensure!(
        config.broker.is_some(),
        "no broker is configured ([brokers.default]): nothing is published, so there is no outbox to show"
    );
    anyhow::ensure!(
        config.store != StoreConfig::Memory,
        "the memory store lives inside the server process; `outbox` commands need [store] provider = \"sqlite\" or \"postgres\""
    );
    let store = store::open(&config.store)?;
    let outbox = store.outbox().context("this store keeps no outbox")?;
    match &args.action {
        OutboxAction::List {
            stream,
            limit,
            json,
        } => {
            let rows = outbox.pending(stream.as_deref(), *limit)?;
            if *json {
                println!("{}", serde_json::to_string_pretty(&rows)?);
            } else {
                print_outbox(&rows, &outbox.counts(config.outbox.max_attempts)?);
            }
        }
        OutboxAction::Republish { stream, .. } => {
            if let Some(stream) = stream {
                ensure_waiting(outbox, stream)?;
            }
            let cleared = outbox.republish(stream.as_deref())?;
            let which = stream
                .as_deref()
                .map_or("every stream".to_owned(), |s| format!("stream {s}"));
            println!("{cleared} row(s) of {which} were waiting for a retry; a running server publishes them now, in order");
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `schedules list`, `inspect` and `cancel`: read the store's schedules, cancel a pending one. Needs no
/// domain, only the config; a running server never fires a schedule once it is cancelled.
fn schedules(common: &Common, args: &SchedulesArgs) -> anyhow::Result<ExitCode> {
    use protean_host::{
        clock::SYSTEM,
        ops::schedules::{self as shown, Cancel, ScheduleView},
        store::{ScheduleQuery, StoreConfig},
    };
    let config = Config::load(common.config.as_deref())?;
    anyhow::ensure!(
        config.store != StoreConfig::Memory,
        "the memory store lives inside the server process; `schedules` commands need [store] provider = \"sqlite\" or \"postgres\""
    );
    let store = store::open(&config.store)?;
    let now = SYSTEM.now_ms();
    let not_found = |key: &str| {
        format!("no schedule with key {key:?}; list them with `protean-host schedules list`")
    };
    match &args.action {
        SchedulesAction::List { state, limit, json } => {
            let query = ScheduleQuery {
                state: state.map(|s| s.state()),
                limit: *limit as usize,
            };
            let rows = store.schedules().list(&query)?;
            if *json {
                let views: Vec<ScheduleView> = rows.iter().map(ScheduleView::from).collect();
                println!("{}", serde_json::to_string_pretty(&views)?);
            } else {
                let overdue_after = config.scheduler.overdue_after.as_millis() as u64;
                let counts = store.schedules().counts(now - overdue_after as i64)?;
                print!("{}", shown::list_text(&rows, &counts, overdue_after, now));
            }
        }
        SchedulesAction::Inspect { key, json } => {
            let schedule = store
                .schedules()
                .get(key)?
                .with_context(|| not_found(key))?;
            if *json {
                let view = ScheduleView::from(&schedule);
                println!("{}", serde_json::to_string_pretty(&view)?);
            } else {
                print!("{}", shown::inspect_text(&schedule, now));
            }
        }
        SchedulesAction::Cancel { key } => match shown::cancel(store.as_ref(), key, now)? {
            Cancel::Cancelled(s) => println!(
                "cancelled schedule {key}: its {} to {} (due {}) will not be appended",
                s.message_type,
                s.stream,
                shown::time(s.due_ms)
            ),
            Cancel::AlreadyCancelled(s) => println!(
                "schedule {key} was not pending: already cancelled at {}",
                shown::settled_at(&s)
            ),
            Cancel::AlreadyFired(s) => anyhow::bail!(
                "schedule {key} was not pending: already fired at {}; its message {} was appended to {}",
                shown::settled_at(&s),
                s.id,
                s.stream
            ),
            Cancel::SetAgain(s) => anyhow::bail!(
                "schedule {key} was set again while it was being cancelled: pending again, due {}; cancel it again to stop it",
                shown::time(s.due_ms)
            ),
            Cancel::NotFound => anyhow::bail!(not_found(key)),
        },
    }
    Ok(ExitCode::SUCCESS)
}

/// A stream given to `outbox republish` must have rows waiting: a typo is an error, not "0 rows".
fn ensure_waiting(outbox: &dyn protean_host::store::Outbox, stream: &str) -> anyhow::Result<()> {
    if !outbox.pending(Some(stream), 1)?.is_empty() {
        return Ok(());
    }
    let mut waiting: Vec<String> = outbox
        .pending(None, 10_000)?
        .into_iter()
        .map(|r| r.target)
        .collect();
    waiting.sort();
    waiting.dedup();
    let known = if waiting.is_empty() {
        "no stream has rows waiting".to_owned()
    } else {
        format!("streams with rows waiting: {}", waiting.join(", "))
    };
    anyhow::bail!("no outbox rows wait for stream {stream:?}; {known}")
}

fn print_outbox(
    rows: &[protean_host::store::PendingRow],
    counts: &protean_host::store::OutboxCounts,
) {
    println!(
        "{:<28} {:>8} {:>8} {:>10} {:>10}  {:<50} error",
        "stream", "seq", "attempts", "age", "retry in", "message"
    );
    let now = protean_host::store::now_ms();
    for r in rows {
        let retry = match r.next_attempt_at.saturating_sub(now) {
            0 => "now".to_owned(),
            ms => format!("{:.1} s", ms as f64 / 1000.0),
        };
        println!(
            "{:<28} {:>8} {:>8} {:>10} {:>10}  {:<50} {}",
            r.target,
            r.seq,
            r.attempts,
            format!("{:.1} s", r.age_ms as f64 / 1000.0),
            retry,
            format!("{} {}", r.stream, r.message_type),
            r.last_error.as_deref().unwrap_or("-")
        );
    }
    println!(
        "{} pending ({} failing, {} held)",
        counts.pending, counts.failing, counts.held
    );
}

/// The dead-letter commands. Broker dead letters live in each group's dead-letter stream; event-store
/// dead letters live in the store and are listed with them.
fn dlq(common: &Common, args: &DlqArgs) -> anyhow::Result<ExitCode> {
    let (engine, _) = engine(common, false, Clock::system())?;
    let named = match &args.action {
        DlqAction::List { .. } => None,
        DlqAction::Inspect { subscription, .. }
        | DlqAction::Replay { subscription, .. }
        | DlqAction::ReplayAll { subscription, .. }
        | DlqAction::Purge { subscription, .. } => Some(subscription),
    };
    let on_store = named.filter(|name| {
        engine.subscriptions().iter().any(|(p, _)| &&p.name == name)
            && !engine.stream_subscriptions().contains(name)
    });
    if on_store.is_some() {
        return store_dlq(&engine, &args.action);
    }
    // Read before the runtime starts: the PostgreSQL store's client is synchronous and runs a runtime
    // of its own, which cannot start inside this one.
    let stored = match &args.action {
        DlqAction::List { .. } => engine.store().dead_letters(None)?,
        _ => Vec::new(),
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let broker = match &engine.config().broker {
            Some(config) => Some(protean_host::broker::open(config).await?),
            None => None,
        };
        let admin = broker.as_deref().and_then(|b| b.dead_letters());
        let known: Vec<String> = engine.subscriptions().iter().map(|(plan, _)| plan.name.clone()).collect();
        let streams = engine.stream_subscriptions();
        let check = |name: &str| -> anyhow::Result<()> {
            anyhow::ensure!(known.iter().any(|k| k == name), "no subscription {name:?} in this domain; subscriptions: {}", known.join(", "));
            Ok(())
        };
        let broker_admin = |name: &str| -> anyhow::Result<&dyn protean_host::broker::DeadLetterAdmin> {
            check(name)?;
            admin.context("no broker is configured; dead letters of event-store subscriptions are listed by `dlq list`")
        };
        match &args.action {
            DlqAction::List { subscription, limit, json } => {
                let names: Vec<String> = match subscription {
                    Some(name) => {
                        check(name)?;
                        vec![name.clone()]
                    }
                    None => known.clone(),
                };
                let mut rows = Vec::new();
                for name in &names {
                    if let (Some(admin), true) = (admin, streams.contains(name)) {
                        for entry in admin.list(name, *limit).await? {
                            rows.push(serde_json::json!({"subscription": name, "id": entry.id, "fields": entry.fields}));
                        }
                    }
                    for dead in stored.iter().filter(|d| &d.subscription == name).take(*limit) {
                        rows.push(serde_json::json!({"subscription": name, "id": dead.global_position.to_string(), "fields": dead}));
                    }
                }
                print_dead_letters(&rows, *json);
            }
            DlqAction::Inspect { id, subscription } => {
                let entry = broker_admin(subscription)?.list(subscription, usize::MAX).await?.into_iter().find(|e| &e.id == id);
                let entry = entry.with_context(|| format!("no dead letter {id} in {subscription}; list them with `protean-host dlq list --subscription {subscription}`"))?;
                println!("{}", serde_json::to_string_pretty(&entry)?);
            }
            DlqAction::Replay { id, subscription } => {
                let replayed = broker_admin(subscription)?.replay(subscription, id).await?;
                anyhow::ensure!(replayed, "no dead letter {id} in {subscription}; list them with `protean-host dlq list --subscription {subscription}`");
                println!("replayed {id} to {subscription}");
            }
            DlqAction::ReplayAll { subscription, yes } => {
                let admin = broker_admin(subscription)?;
                let entries = admin.list(subscription, usize::MAX).await?;
                anyhow::ensure!(*yes, "this replays {} dead letters of {subscription}; add --yes to confirm", entries.len());
                for entry in &entries {
                    admin.replay(subscription, &entry.id).await?;
                }
                println!("replayed {} dead letters to {subscription}", entries.len());
            }
            DlqAction::Purge { subscription, yes } => {
                let admin = broker_admin(subscription)?;
                let count = admin.list(subscription, usize::MAX).await?.len();
                anyhow::ensure!(*yes, "this deletes {count} dead letters of {subscription}; add --yes to confirm");
                println!("purged {} dead letters of {subscription}", admin.purge(subscription).await?);
            }
        }
        Ok(ExitCode::SUCCESS)
    })
}

/// The dead-letter commands for an event-store subscription: its dead letters are in the store, and
/// a replay handles the message here, with the loaded build (the store is synchronous: no runtime).
fn store_dlq(engine: &Engine, action: &DlqAction) -> anyhow::Result<ExitCode> {
    let store = engine.store();
    let waiting = |subscription: &str| store.dead_letters(Some(subscription));
    match action {
        DlqAction::List { .. } => unreachable!("dlq list reads every subscription's dead letters"),
        DlqAction::Inspect { id, subscription } => {
            let dead = waiting(subscription)?
                .into_iter()
                .find(|d| &d.global_position.to_string() == id)
                .with_context(|| format!("no dead letter {id} waits in {subscription}; list them with `protean-host dlq list --subscription {subscription}`"))?;
            println!("{}", serde_json::to_string_pretty(&dead)?);
        }
        DlqAction::Replay { id, subscription } => {
            let position: u64 = id.parse().with_context(|| {
                format!("dead letters of {subscription} are named by global position (a number), not {id:?}; list them with `protean-host dlq list --subscription {subscription}`")
            })?;
            return replay_one(engine, subscription, position);
        }
        DlqAction::ReplayAll { subscription, yes } => {
            let letters = waiting(subscription)?;
            anyhow::ensure!(
                *yes,
                "this replays {} dead letters of {subscription}; add --yes to confirm",
                letters.len()
            );
            let mut code = ExitCode::SUCCESS;
            for dead in &letters {
                if replay_one(engine, subscription, dead.global_position)? != ExitCode::SUCCESS {
                    code = ExitCode::FAILURE;
                }
            }
            return Ok(code);
        }
        DlqAction::Purge { subscription, yes } => {
            let count = waiting(subscription)?.len();
            anyhow::ensure!(
                *yes,
                "this deletes {count} dead letters of {subscription}; add --yes to confirm"
            );
            let parked = store.parked_keys(subscription)?;
            println!(
                "purged {} dead letters of {subscription}",
                store.purge_dead_letters(subscription)?
            );
            for key in parked.iter().filter(|k| !k.released) {
                print_released(subscription, key);
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Replay one event-store dead letter; exit 1 when it failed again (its new dead letter says why).
fn replay_one(engine: &Engine, subscription: &str, position: u64) -> anyhow::Result<ExitCode> {
    match engine.replay_dead_letter(subscription, position)? {
        protean_host::engine::Replay::Handled => {
            println!(
                "replayed {position} to {subscription}: handled by build {}",
                engine.build_id()
            );
            let parked = engine.store().parked_keys(subscription)?;
            for key in parked
                .iter()
                .filter(|k| k.dead_letter == position && k.released)
            {
                print_released(subscription, key);
            }
            Ok(ExitCode::SUCCESS)
        }
        protean_host::engine::Replay::DeadLettered => {
            eprintln!("error: dead letter {position} of {subscription} failed again and is dead-lettered anew; see `protean-host dlq list --subscription {subscription}`");
            Ok(ExitCode::FAILURE)
        }
    }
}

/// Say that the parked `key` of `subscription` was released, and what happens next.
fn print_released(subscription: &str, key: &protean_host::store::ParkedKey) {
    println!(
        "released key {}: its {} held messages are handled next, in order, by the server running {subscription}",
        key.key, key.held
    );
}

/// `subscriptions status`: measured from the store and the broker, without running anything. Exit 1
/// when a figure could not be measured (the table says which and why).
fn subscriptions(common: &Common, args: &SubscriptionsArgs) -> anyhow::Result<ExitCode> {
    let SubscriptionsAction::Status { json } = args.action;
    let (engine, _) = engine(common, false, Clock::system())?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let snapshot = runtime.block_on(async {
        let broker = match &engine.config().broker {
            Some(config) => match protean_host::broker::open(config).await {
                Ok(broker) => Some(broker),
                Err(error) => {
                    tracing::warn!(%error, "broker unavailable; stream figures are missing");
                    None
                }
            },
            None => None,
        };
        let targets = ops::status::targets(&engine);
        let limits = ops::status::Limits::of(engine.config(), std::time::Duration::from_secs(5));
        let configured = engine.config().broker.is_some();
        ops::status::measure(engine.store(), broker, configured, &targets, limits).await
    });
    if json {
        println!("{}", serde_json::to_string_pretty(&snapshot)?);
    } else {
        print!("{snapshot}");
    }
    let measured = snapshot.subscriptions.iter().all(|s| s.error.is_none());
    Ok(if measured {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// `health`: one line, `ready` (exit 0) or `not ready: why` (exit 1), for container probes.
fn health(common: &Common, args: &HealthArgs) -> anyhow::Result<ExitCode> {
    let url = match &args.url {
        Some(url) => url.clone(),
        None => {
            let settings = Config::load(common.config.as_deref())?.health;
            anyhow::ensure!(
                settings.port != 0,
                "[server.health] port = 0 picks a free port at start; pass the logged address with --url"
            );
            let host = match settings.host.as_str() {
                "0.0.0.0" => "127.0.0.1",
                "::" => "[::1]",
                host => host,
            };
            format!("http://{host}:{}/readyz", settings.port)
        }
    };
    let timeout = std::time::Duration::from_millis(args.timeout_ms.max(1));
    let answer = ops::probe::get(&url, timeout)?;
    let (ready, line) = ops::probe::verdict(&answer);
    println!("{line}");
    Ok(if ready {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn print_dead_letters(rows: &[serde_json::Value], json: bool) {
    if json {
        println!("{}", serde_json::to_string_pretty(rows).unwrap_or_default());
        return;
    }
    println!(
        "{:<34} {:<20} {:<30} {:>8}  error",
        "subscription", "id", "type", "attempts"
    );
    for row in rows {
        let fields = &row["fields"];
        let message_type = fields["message_type"]
            .as_str()
            .map(str::to_owned)
            .unwrap_or_else(|| {
                let data: serde_json::Value = fields["data"]
                    .as_str()
                    .and_then(|d| serde_json::from_str(d).ok())
                    .unwrap_or_default();
                data["metadata"]["headers"]["type"]
                    .as_str()
                    .unwrap_or("?")
                    .to_owned()
            });
        let attempts = fields["attempts"]
            .as_str()
            .map(str::to_owned)
            .unwrap_or_else(|| fields["attempts"].to_string());
        let error = fields["error"].as_str().unwrap_or_default();
        println!(
            "{:<34} {:<20} {:<30} {:>8}  {error}",
            row["subscription"].as_str().unwrap_or_default(),
            row["id"].as_str().unwrap_or_default(),
            message_type,
            attempts
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(input: &str, limit: usize) -> Vec<Result<String, usize>> {
        let mut input = std::io::Cursor::new(input.as_bytes());
        std::iter::from_fn(|| read_line(&mut input, limit).unwrap())
            .map(|line| match line {
                Line::Text(text) => Ok(text),
                Line::TooLong(size) => Err(size),
            })
            .collect()
    }

    #[test]
    fn a_line_over_the_limit_is_measured_unread_and_the_next_one_reads_whole() {
        let long = "y".repeat(10);
        assert_eq!(
            lines(&format!("abcd\r\n{long}\nabcde\nlast"), 4),
            [
                Ok("abcd".to_owned()),
                Err(10),
                Ok("abcde".to_owned()),
                Ok("last".to_owned())
            ],
            "a line of 5 is read whole: the caller refuses it with its size"
        );
        assert_eq!(lines(&long, 4), [Err(10)], "without a line ending");
        assert!(lines("", 4).is_empty());
    }
}
