//! `logstore`: the command-line client (see `logstore --help` and the crate documentation).
//! Exit codes: 0 ok; 1 the service refused or failed the request; 2 bad usage; 3 conflict
//! (`--expect-seq`); 4 NATS or the workers could not be reached, or did not settle a queued
//! append in time (or NATS refused the login or the TLS handshake).

use std::process::ExitCode;

use clap::FromArgMatches;
use logstore_cli::{Args, CliError};
use logstore_protocol::chain::Chain;

fn main() -> ExitCode {
    let matches = logstore_cli::command().get_matches();
    let args = match Args::from_arg_matches(&matches) {
        Ok(args) => args,
        Err(e) => e.exit(),
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("logstore: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    match runtime.block_on(logstore_cli::run(args, &mut out)) {
        Ok(()) => ExitCode::SUCCESS,
        // `logstore get 42 | head`: the reader had enough, which is not a failure.
        Err(CliError::Output(e)) if e.kind() == std::io::ErrorKind::BrokenPipe => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("logstore: {}", Chain(&e));
            ExitCode::from(e.exit_code())
        }
    }
}
