//! `worker migrate`: bring every shard's schema up to date (and, with `--grant`, its roles),
//! then exit. What a worker does at start, run once per upgrade with the owner's login, so
//! the workers themselves can run with least privilege.

use std::time::Duration;

use tokio::time::Instant;

use crate::config::Config;
use crate::store::Shard;
use crate::{Chain, Error};

/// deploy/postgres/roles.sql: the least-privileged group role's grants (`worker migrate
/// --grant` runs it in every shard).
pub const ROLES_SQL: &str = include_str!("../../deploy/postgres/roles.sql");

/// `worker migrate`: apply the embedded migrations to every shard and record its name (what a
/// worker does at start), then, with `grant`, run [`ROLES_SQL`] there too, and return. Run it
/// once per upgrade with the owner role's login (a superuser or a role with CREATEROLE for
/// `grant`); the workers can then log in as members of `logstore_app`. A shard that does not
/// answer yet is retried every second for up to `wait` (a database that is still starting).
pub async fn migrate(config: &Config, grant: bool, wait: Duration) -> Result<(), Error> {
    for shard_config in &config.shards {
        let shard = Shard::new(shard_config, 1, config.shard_timeout).map_err(Error::Setup)?;
        let deadline = Instant::now() + wait;
        let mut logged: Option<String> = None;
        loop {
            match shard.initialise().await {
                Ok(()) => break,
                Err(e) if e.is_unavailable() && Instant::now() < deadline => {
                    let cause = Chain(&e).to_string();
                    if logged.as_deref() != Some(cause.as_str()) {
                        tracing::warn!(shard = %shard.name, error = %cause, "shard not reachable yet; retrying");
                        logged = Some(cause);
                    }
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
                Err(e) => return Err(e.into()),
            }
        }
        tracing::info!(shard = %shard.name, "schema current, shard name recorded");
        if grant {
            shard.batch_execute(ROLES_SQL).await?;
            tracing::info!(shard = %shard.name, "deploy/postgres/roles.sql applied");
        }
        shard.close();
    }
    Ok(())
}
