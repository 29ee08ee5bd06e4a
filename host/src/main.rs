//! The `protean-host` binary: parses the command line, runs it, and maps the outcome to an exit code
//! (0 success, 1 failure, 2 usage error).

use std::{io::BufRead, process::ExitCode};

use anyhow::Context as _;
use clap::Parser;
use protean_host::{
    cli::{Cli, Command, Common, InspectArgs, LogFormat, SendArgs, ServerArgs},
    config::Config,
    discovery,
    engine::{Engine, EngineOptions, Outcome, RunReport},
    inspect, logging,
    plugin::{Library, Plugin},
};

fn main() -> ExitCode {
    let cli = Cli::parse();
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
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        None => server(&cli.common, &cli.server),
        Some(Command::Server(args)) => server(&cli.common, &args),
        Some(Command::Inspect(args)) => inspect(&cli.common, &args),
        Some(Command::Send(args)) => send(&cli.common, &args),
    }
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

fn load_plugin(common: &Common) -> anyhow::Result<Plugin> {
    let spec = domain_spec(common)?;
    let library = Library::load(&spec.path)?;
    let instance = library.select(spec.instance.as_deref())?;
    let plugin = library.instantiate(&instance, common.level().plugin_level())?;
    tracing::info!(library = %spec.path.display(), instance, build = library.build_id(), handlers = plugin.registrations().len(), "domain loaded");
    Ok(plugin)
}

fn engine(common: &Common, test_mode: bool) -> anyhow::Result<Engine> {
    let config = Config::load(common.config.as_deref())?;
    tracing::debug!(config = %serde_json::to_string(&config).unwrap_or_default(), "resolved configuration");
    let plugin = load_plugin(common)?;
    Ok(Engine::new(plugin, EngineOptions { test_mode, config })?)
}

fn inspect(common: &Common, args: &InspectArgs) -> anyhow::Result<ExitCode> {
    let spec = domain_spec(common)?;
    let library = Library::load(&spec.path)?;
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
    let engine = engine(common, args.test_mode)?;
    let report = engine.run()?;
    if args.test_mode {
        print_summary(&report);
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
    println!("test mode {outcome} ({} ms)", report.elapsed.as_millis());
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

fn send(common: &Common, args: &SendArgs) -> anyhow::Result<ExitCode> {
    let engine = engine(common, false)?;
    let deadline = args.deadline.as_deref();
    let send_one = |text: &str, line: Option<usize>| -> anyhow::Result<()> {
        let at = line
            .map(|n| format!(" (stdin line {n})"))
            .unwrap_or_default();
        let data: serde_json::Value = serde_json::from_str(text).with_context(|| {
            format!("the command data{at} is not JSON; pass an object like '{{\"id\": \"1\"}}'")
        })?;
        let id = engine
            .send(&args.message_type, &data, deadline)
            .with_context(|| format!("command{at} not sent"))?;
        println!("{id}");
        Ok(())
    };
    if let Some(deadline) = deadline {
        protean_host::message::parse_time(deadline).with_context(|| {
            format!("--deadline {deadline:?} is not an RFC 3339 time like 2030-01-31T12:00:00Z")
        })?;
    }
    if args.data != "-" {
        send_one(&args.data, None)?;
        return Ok(ExitCode::SUCCESS);
    }
    for (n, line) in std::io::stdin().lock().lines().enumerate() {
        let line = line.context("cannot read stdin")?;
        if !line.trim().is_empty() {
            send_one(&line, Some(n + 1))?;
        }
    }
    Ok(ExitCode::SUCCESS)
}
