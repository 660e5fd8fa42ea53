//! `loadgen`: drives appends and queries into logstore over NATS, prints throughput and latency
//! percentiles, and with `--verify` proves nothing acknowledged was lost. Settings come from
//! flags or env vars (`loadgen --help`).
//!
//! Exit codes: 0 = done (and verified, if asked); 1 = verify found a problem (or nothing was
//! acknowledged to verify), an append was given up on, or the run could not start; 2 = invalid
//! settings, or `--jetstream[=false]` forced an intake the workers do not run (the line says
//! which flag to use).

use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use loadgen::Args;
use logstore_protocol::chain::Chain;

fn main() -> ExitCode {
    let args = Args::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("loadgen: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(run(args))
}

async fn run(args: Args) -> ExitCode {
    let (signalled, shutdown) = match signals() {
        Ok(pair) => pair,
        Err(e) => {
            eprintln!("loadgen: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    if let Some(id) = args.read_whole {
        signalled.abort();
        return match loadgen::read_whole(&args, id).await {
            Ok(read) => {
                print!("{read}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("loadgen: {}", Chain(&e));
                ExitCode::FAILURE
            }
        };
    }
    let result = loadgen::run(args, shutdown).await;
    signalled.abort();
    match result {
        Ok(outcome) => {
            print!("{}", outcome.summary);
            if outcome.success() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Err(e @ (loadgen::Error::Config(_) | loadgen::Error::IntakeMismatch(_))) => {
            eprintln!("loadgen: {e}");
            ExitCode::from(2)
        }
        Err(e) => {
            eprintln!("loadgen: {}", Chain(&e));
            ExitCode::FAILURE
        }
    }
}

/// The first SIGINT/SIGTERM completes the returned future (a clean stop: summary, verify); a
/// second one quits at once, for a user who does not want to wait for in-flight appends.
fn signals() -> anyhow::Result<(
    tokio::task::JoinHandle<()>,
    impl std::future::Future<Output = ()>,
)> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).context("cannot handle SIGTERM")?;
    let mut int = signal(SignalKind::interrupt()).context("cannot handle SIGINT")?;
    let (first, first_seen) = tokio::sync::oneshot::channel::<()>();
    let watcher = tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        eprintln!("loadgen: stopping: waiting for in-flight operations (signal again to quit now)");
        let _ = first.send(());
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        eprintln!("loadgen: quitting without waiting");
        std::process::exit(130);
    });
    Ok((watcher, async move {
        let _ = first_seen.await;
    }))
}
