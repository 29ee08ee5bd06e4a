//! The `protean-host` binary: parses the command line, runs it, and maps the outcome to an exit code
//! (0 success, 1 failure, 2 usage error).

use std::process::ExitCode;

use anyhow::Context as _;
use clap::Parser;
use protean_host::{
    cli::{Cli, Command, Common, InspectArgs, LogFormat, ServerArgs},
    discovery, inspect, logging,
    plugin::Library,
};

fn main() -> ExitCode {
    let cli = Cli::parse();
    logging::init(cli.common.level(), cli.common.log_format);
    let cli_format = cli.common.log_format;
    match run(cli) {
        Ok(code) => code,
        Err(error) => {
            // One line, where the operator looks: the JSON log stream when there is one, else stderr.
            match cli_format {
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

fn server(common: &Common, _args: &ServerArgs) -> anyhow::Result<ExitCode> {
    let spec = domain_spec(common)?;
    let library = Library::load(&spec.path)?;
    let instance = library.select(spec.instance.as_deref())?;
    let plugin = library.instantiate(&instance, common.level().plugin_level())?;
    tracing::info!(library = %spec.path.display(), instance, build = library.build_id(), handlers = plugin.registrations().len(), "domain loaded");
    anyhow::bail!("running the domain is not built yet (see the engine issue); use `protean-host inspect` to see what would run")
}
