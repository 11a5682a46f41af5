//! `evpc-client`: one road warrior against an evpc gateway cluster, reporting JSON lines on
//! stdout (see the library's `report` module for every line). Exit status: 0 after
//! SIGTERM/SIGINT, 3 when the IKE SA ended, 2 for bad arguments, 1 for other failures.

use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use evpc_client::clock::Clock;
use evpc_client::metrics::DriverMetrics;
use evpc_client::report::{Report, Reporter};
use evpc_client::{Args, ClientError, Settings, run};

fn main() -> ExitCode {
    let args = match Args::try_parse() {
        Ok(args) => args,
        Err(error) => return refuse(&error),
    };
    // Logs go to stderr and stay quiet by default: hundreds of clients share one terminal or
    // log file, and stdout is the report.
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .init();
    match client(args) {
        Ok(status) => ExitCode::from(status),
        Err(failure) => {
            if !failure.reported {
                let message = format!("{:#}", failure.error);
                eprintln!("evpc-client: {message}");
                // The runner reads stdout: the failure goes there too (if stdout is still there).
                let _ = Reporter::new(std::io::stdout())
                    .emit(Clock::new().now(), &Report::Error { message });
            }
            ExitCode::from(failure.status)
        }
    }
}

/// Prints clap's verdict (help and version on stdout, errors with the usage on stderr) and, for
/// an error, puts its first line on stdout as an `error` line too: the runner reads only that.
fn refuse(error: &clap::Error) -> ExitCode {
    let _ = error.print();
    if error.use_stderr() {
        // the paragraph before the usage, on one line
        let rendered = error.render().to_string();
        let message = rendered
            .lines()
            .take_while(|line| !line.trim().is_empty())
            .map(str::trim)
            .collect::<Vec<_>>()
            .join(" ");
        let message = message
            .strip_prefix("error: ")
            .unwrap_or(&message)
            .to_owned();
        let _ =
            Reporter::new(std::io::stdout()).emit(Clock::new().now(), &Report::Error { message });
    }
    ExitCode::from(u8::try_from(error.exit_code()).unwrap_or(2))
}

/// Why the client failed, and whether the report already says so.
struct Failure {
    error: anyhow::Error,
    status: u8,
    reported: bool,
}

impl From<anyhow::Error> for Failure {
    fn from(error: anyhow::Error) -> Failure {
        Failure {
            error,
            status: 1,
            reported: false,
        }
    }
}

fn client(args: Args) -> Result<u8, Failure> {
    let settings =
        Settings::from_args(args, |name| std::env::var_os(name)).map_err(|e| Failure {
            status: e.exit_status(),
            error: e.into(),
            reported: false,
        })?;
    // Before the driver exists: its workers take their counter handles when they start.
    let metrics = DriverMetrics::install();
    if metrics.is_none() {
        tracing::warn!("another metrics recorder is installed: the driver's totals stay at 0");
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("building the runtime")?;
    match runtime.block_on(run(settings, metrics, std::io::stdout())) {
        Ok(exit) => Ok(exit.status()),
        // `run` reported everything but a failing stdout itself
        Err(error) => Err(Failure {
            status: error.exit_status(),
            reported: !matches!(error, ClientError::Report(_)),
            error: error.into(),
        }),
    }
}
