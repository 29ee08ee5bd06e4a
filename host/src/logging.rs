//! Log output: `tracing` to stderr, as console lines or one JSON object per line.

use tracing_subscriber::{fmt, EnvFilter};

use crate::cli::{LogFormat, LogLevel};

impl LogLevel {
    fn directive(self) -> &'static str {
        match self {
            LogLevel::Error => "error",
            LogLevel::Warn => "warn",
            LogLevel::Info => "info",
            LogLevel::Debug => "debug",
            LogLevel::Trace => "trace",
        }
    }

    /// The level number plugins understand (1 = error ... 5 = trace).
    pub(crate) fn plugin_level(self) -> u8 {
        self as u8 + 1
    }
}

/// Install the global subscriber. Dependencies stay at `warn` unless the level asks for more from us.
pub(crate) fn init(level: LogLevel, format: LogFormat) {
    let level = level.directive();
    let filter = EnvFilter::new(format!("warn,protean_host={level},plugin={level}"));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(ansi);
    let _ = match format {
        LogFormat::Console => builder.try_init(),
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .try_init(),
    };
}
