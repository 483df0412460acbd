//! The `fleettracker` binary: parses the command line and hands over. Wiring only.

use fleettracker::config::{Cli, Command};
use std::process::ExitCode;

fn main() -> ExitCode {
    let cli = Cli::parse_checked();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Serve(config) => {
                fleettracker::server::init_logging(config.log_format);
                fleettracker::server::serve(*config).await
            }
            Command::Simulate(config) => fleettracker::sim::run(config).await,
            Command::Worker(config) => {
                fleettracker::server::init_logging(config.log_format);
                fleettracker::history::postgres::worker::run(config).await
            }
            Command::Keys(command) => {
                fleettracker::trust::cli::run(command, &mut std::io::stdout())
            }
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// jemalloc instead of glibc malloc. Measured (BENCHMARKS.md): per-request allocations made glibc's
/// malloc/free/consolidation ~9% of the POST path's CPU, and jemalloc keeps the index's memory at
/// ~105 B/driver where mimalloc, equally fast, fragmented it to ~150 B/driver.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;
