//! `worker`: runs a logstore worker (the default), migrates the shards once (`worker migrate
//! [--grant]`), or answers operator questions about the configuration (`worker ring <id>...`).
//! All settings come from env vars or flags (`--help`).

use std::io::IsTerminal;
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Parser, Subcommand};
use tracing_subscriber::EnvFilter;
use worker::config::RawConfig;

#[derive(Parser)]
#[command(
    name = "worker",
    version,
    about = "logstore worker: sharded, idempotent log storage behind NATS"
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    config: RawConfig,
}

#[derive(Subcommand)]
enum Command {
    /// Run the worker (the default when no command is given).
    Run,
    /// Apply the schema migrations to every shard and record its name, then exit: run it once
    /// (per upgrade) with the owner role's login, so that the workers can log in as a
    /// least-privileged role (deploy/postgres/roles.sql).
    Migrate {
        /// Also apply deploy/postgres/roles.sql (embedded) in every shard: the grants of the
        /// group role `logstore_app`. Needs a superuser or CREATEROLE login.
        #[arg(long)]
        grant: bool,
        /// How long to wait for a shard that does not answer yet, in seconds.
        #[arg(long, default_value_t = 60)]
        wait_secs: u64,
    },
    /// Grow or shrink the fleet's shard set online, show it (the ring record in NATS), or
    /// repair the record from the shards' copies.
    Shards {
        #[command(subcommand)]
        command: ShardsCommand,
    },
    /// Print the shard that owns each given object id under the current configuration.
    Ring {
        /// Object ids (u64).
        #[arg(required = true)]
        ids: Vec<u64>,
    },
}

#[derive(Subcommand)]
enum ShardsCommand {
    /// Add a PostgreSQL node: NAME=URL as in POSTGRES_SHARDS (the URL's user and password are
    /// used to prepare the node now and never stored: the workers log in with their own login).
    /// A database of another fleet is refused. Returns once the move has started.
    Add {
        #[arg(value_name = "NAME=URL")]
        spec: String,
    },
    /// Remove a node: its objects move to the others. Returns once the move has started.
    Remove { name: String },
    /// Print the epoch, the members and the move's progress. Exit 0 when no move runs, 3
    /// while one does.
    Status {
        /// One JSON line: {"ring": <record>, "progress": <progress or null>}.
        #[arg(long)]
        json: bool,
    },
    /// Rewrite the ring record (missing, or not decoding: overwritten by someone allowed to
    /// write the NATS key) from the copies the shards keep: the latest one of the fleet wins.
    /// A move that was running goes on. Exit 0 (steady) or 3 (a move goes on).
    Repair,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let config = match cli.config.validate() {
        Ok(config) => Arc::new(config),
        Err(e) => {
            eprintln!("worker: {e}");
            return ExitCode::from(2);
        }
    };
    init_logging(config.json_logs);
    match cli.command {
        Some(Command::Ring { ids }) => {
            let names: Vec<&str> = config.shards.iter().map(|s| s.name.as_str()).collect();
            let ring = worker::ring::Ring::new(&names, config.ring_vnodes);
            let mut out = worker::admin::Out::default();
            for id in ids {
                out.line(format_args!("{id} {}", ring.shard_name_of(id)));
            }
            ExitCode::SUCCESS
        }
        Some(Command::Migrate { grant, wait_secs }) => migrate(&config, grant, wait_secs),
        Some(Command::Shards { command }) => shards(&config, command),
        None | Some(Command::Run) => run(config),
    }
}

/// A single-threaded runtime for the one-shot commands (`migrate`, `shards`); None (said on
/// stderr) if it cannot start.
fn one_shot_runtime() -> Option<tokio::runtime::Runtime> {
    match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => Some(runtime),
        Err(e) => {
            eprintln!("worker: cannot start the async runtime: {e}");
            None
        }
    }
}

fn migrate(config: &worker::config::Config, grant: bool, wait_secs: u64) -> ExitCode {
    let Some(runtime) = one_shot_runtime() else {
        return ExitCode::FAILURE;
    };
    let wait = std::time::Duration::from_secs(wait_secs);
    match runtime.block_on(worker::migrate(config, grant, wait)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let line = logstore_protocol::chain::Chain(&e).to_string();
            say_failure(config.json_logs, "worker migrate", &line);
            ExitCode::FAILURE
        }
    }
}

fn shards(config: &worker::config::Config, command: ShardsCommand) -> ExitCode {
    let Some(runtime) = one_shot_runtime() else {
        return ExitCode::FAILURE;
    };
    let command = match command {
        ShardsCommand::Add { spec } => worker::admin::Command::Add { spec },
        ShardsCommand::Remove { name } => worker::admin::Command::Remove { name },
        ShardsCommand::Status { json } => worker::admin::Command::Status { json },
        ShardsCommand::Repair => worker::admin::Command::Repair,
    };
    let work = worker::admin::shards(config, command);
    match runtime
        .block_on(async { tokio::time::timeout(std::time::Duration::from_secs(60), work).await })
    {
        Ok(Ok(status)) => ExitCode::from(status),
        Ok(Err(e)) => {
            eprintln!("worker shards: {}", logstore_protocol::chain::Chain(&e));
            ExitCode::FAILURE
        }
        Err(_) => {
            eprintln!("worker shards: no answer from NATS within 60 s");
            ExitCode::FAILURE
        }
    }
}

fn run(config: Arc<worker::config::Config>) -> ExitCode {
    let json = config.json_logs;
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("worker: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        let shutdown = match shutdown_signal() {
            Ok(signal) => signal,
            Err(e) => return Err(anyhow::anyhow!("cannot install signal handlers: {e}")),
        };
        worker::run(config, shutdown)
            .await
            .map_err(anyhow::Error::from)
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // One line with every cause once (anyhow's `{:#}` would repeat the causes that
            // async-nats already writes into its own messages).
            let line = worker::Chain(e.as_ref()).to_string();
            say_failure(json, "worker", &line);
            ExitCode::FAILURE
        }
    }
}

/// Why the worker stops, said once: the last line on stderr, `worker: <cause>` (a person or
/// a supervisor reads it there), or with LOG_FORMAT=json one JSON error line like every other.
/// Nothing logs the cause before: whoever returns it leaves the saying to this.
fn say_failure(json: bool, program: &str, line: &str) {
    if json {
        tracing::error!(error = %line, "{program} stopped");
    } else {
        eprintln!("{program}: {line}");
    }
}

/// Completes on the first SIGTERM or SIGINT.
fn shutdown_signal() -> std::io::Result<impl std::future::Future<Output = ()>> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM received"),
            _ = int.recv() => tracing::info!("SIGINT received"),
        }
    })
}

/// The log filter when RUST_LOG is unset or empty. The worker logs what its libraries would
/// say about connections itself, once, with the server and the cause:
/// - async-nats logs every connection event at INFO ("event: client error: nats: IO error"
///   once per failed attempt, without server or cause), and a refused login at ERROR from its
///   connector; the worker logs each attempt (`nats::connect`) and the refusal (its exit line).
/// - deadpool-postgres warns once per pooled connection that a shard outage closes
///   ("Connection error: db error", "Connection could not be recycled"), naming neither shard
///   nor cause; the health watcher logs the outage once, with both.
///
/// RUST_LOG replaces all of it (`RUST_LOG=info,deadpool=warn` to see deadpool's lines).
const DEFAULT_LOG_FILTER: &str = "info,async_nats=warn,async_nats::connector=off,deadpool=error";

fn init_logging(json: bool) {
    let filter = match std::env::var("RUST_LOG") {
        Ok(directives) if !directives.trim().is_empty() => EnvFilter::try_new(directives).ok(),
        _ => None,
    }
    .unwrap_or_else(|| EnvFilter::new(DEFAULT_LOG_FILTER));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        // Colour codes only for a person at a terminal: in a file, `docker logs` or journald
        // they are noise around every field.
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}
