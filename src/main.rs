//! The `fleettracker` binary: parses the command line and hands over. Wiring only.

use clap::Parser;
use fleettracker::config::{Cli, Command};
use std::process::ExitCode;

fn main() -> ExitCode {
    let cli = Cli::parse();
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
                fleettracker::server::serve(config).await
            }
            Command::Simulate(config) => fleettracker::sim::run(config).await,
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

/// mimalloc instead of glibc malloc: per-request allocations (hyper buffers, headers, JSON) are
/// small and short-lived, and glibc's consolidation showed up in profiles of the POST path.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;
