use clap::Parser;
use tracing_subscriber::EnvFilter;

use beemesh::cli::{Cli, Command, LogFormat};

fn init_tracing(format: LogFormat, default_level: &str) {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(colours_wanted());
    match format {
        LogFormat::Human => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

/// Colours only for a person at a terminal, and not when NO_COLOR is set
/// (https://no-color.org): log files and pipes get plain text.
fn colours_wanted() -> bool {
    use std::io::IsTerminal;
    std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty())
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    // Clients print results; only the long-running roles log progress by default.
    let default_level = match cli.command {
        Command::Agent(_) | Command::Node(_) | Command::FenceWatchdog(_) => "info",
        Command::Id(_) | Command::Status(_) | Command::Token(_) => "warn",
    };
    init_tracing(cli.logging.log_format, default_level);
    match beemesh::commands::run_to_end(cli.command) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            // The cause chain on one line, without a backtrace: a message for people.
            eprintln!("Error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
