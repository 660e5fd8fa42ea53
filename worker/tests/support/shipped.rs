//! The shipped NATS deployment under test: deploy/nats/nats-server.conf run by
//! deploy/nats/run-nats.sh (as docker-compose.yaml runs it) with each user's password in a
//! file, or deploy/nats/cluster.conf on a 3-node cluster (as docker-compose.ha.yaml runs it),
//! and the settings and clients of its users (`worker`, `admin`, `client`): [`Logins`].

use std::time::Duration;

use logstore_protocol::nats::NatsSecurityArgs;

use super::servers::{Launcher, NatsCluster, NatsServer};
use super::{unique_name, within, Env, WorkerCommand, WorkerProcess};

/// Settings as (variable, value) pairs.
pub type Vars = Vec<(&'static str, String)>;

pub const USERS: [&str; 3] = ["worker", "admin", "client"];

/// deploy/nats/nats-server.conf run by deploy/nats/run-nats.sh, each user's password in a file.
pub struct Shipped {
    pub nats: NatsServer,
    logins: Logins,
}

impl Shipped {
    pub fn start() -> Shipped {
        let (dir, env) = password_files();
        let nats = NatsServer::start_launched(Launcher {
            script: Some(run_nats()),
            env,
            ..Default::default()
        });
        let url = nats.url();
        Shipped {
            nats,
            logins: Logins { dir, url },
        }
    }
}

impl std::ops::Deref for Shipped {
    type Target = Logins;

    fn deref(&self) -> &Logins {
        &self.logins
    }
}

/// deploy/nats/cluster.conf on a 3-node cluster, each server started by run-nats.sh with its
/// name in NATS_SERVER_NAME (the routes and listen address given as flags: the file's name the
/// compose services).
pub struct ShippedCluster {
    pub cluster: NatsCluster,
    logins: Logins,
}

impl ShippedCluster {
    pub fn start() -> ShippedCluster {
        let (dir, env) = password_files();
        let conf =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/nats/cluster.conf");
        let cluster = NatsCluster::start_launched(|name| {
            let mut env = env.clone();
            env.push(("NATS_CONF".to_string(), conf.display().to_string()));
            env.push(("NATS_SERVER_NAME".to_string(), name.to_string()));
            Launcher {
                script: Some(run_nats()),
                env,
                ..Default::default()
            }
        });
        let url = cluster.nats_url();
        ShippedCluster {
            cluster,
            logins: Logins { dir, url },
        }
    }
}

impl std::ops::Deref for ShippedCluster {
    type Target = Logins;

    fn deref(&self) -> &Logins {
        &self.logins
    }
}

/// deploy/nats/run-nats.sh.
fn run_nats() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/nats/run-nats.sh")
}

/// A fresh password file for each of [`USERS`], and the variables naming them for run-nats.sh.
fn password_files() -> (tempfile::TempDir, Vec<(String, String)>) {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut env = Vec::new();
    for user in USERS {
        let path = dir.path().join(format!("{user}.password"));
        std::fs::write(&path, format!("{}\n", unique_name(user))).expect("password file");
        env.push((
            format!("NATS_{}_PASSWORD_FILE", user.to_uppercase()),
            path.display().to_string(),
        ));
    }
    (dir, env)
}

/// The users' password files and the NATS_URL they log in to.
pub struct Logins {
    dir: tempfile::TempDir,
    url: String,
}

impl Logins {
    /// The file holding `user`'s password.
    pub fn password_file(&self, user: &str) -> String {
        self.dir
            .path()
            .join(format!("{user}.password"))
            .display()
            .to_string()
    }

    /// NATS_URL and `user`'s login, as the CLI, loadgen and the worker read them.
    pub fn login(&self, user: &str) -> Vars {
        vec![
            ("NATS_URL", self.url.clone()),
            ("NATS_USER", user.to_string()),
            ("NATS_PASSWORD_FILE", self.password_file(user)),
            ("LOGSTORE_TIMEOUT_MS", "3000".to_string()),
        ]
    }

    /// A worker's settings on top of `env`'s: the shipped config's subjects, queue group and
    /// stream (logstore's defaults), logged in as `worker`, default (JetStream, ordered) intake.
    pub fn worker_settings(&self) -> Vars {
        let mut vars = self.login("worker");
        vars.retain(|(var, _)| *var != "LOGSTORE_TIMEOUT_MS");
        for (var, value) in [
            ("NATS_LOGS_TOPIC", "logs"),
            ("NATS_QUERY_TOPIC", "query"),
            ("NATS_RESPONSE_TOPIC", "response"),
            ("NATS_STATS_TOPIC", "stats"),
            ("NATS_DELETE_TOPIC", "delete"),
            ("NATS_QUEUE_GROUP", "workers"),
            ("NATS_EVENTS_PREFIX", "appended"),
            ("NATS_REJECTED_PREFIX", "rejected"),
            ("NATS_DEAD_LETTER_TOPIC", "dead_letter"),
            ("DEAD_LETTERS_STREAM", "DEAD_LETTERS"),
            ("NATS_STREAM", "LOGS"),
            ("INTAKE", "jetstream"),
        ] {
            vars.push((var, value.to_string()));
        }
        vars
    }

    /// A worker process on `env`'s shards with [`Logins::worker_settings`], logging at info
    /// level into a capture the test can read, started and ready.
    pub async fn start_worker(&self, env: &Env) -> WorkerProcess {
        WorkerCommand::new(env)
            .extra(&self.worker_settings())
            .log("info")
            .capture()
            .start()
            .await
    }

    /// A client logged in as `user` that reports the server's errors (permission violations).
    pub async fn connect(&self, user: &str) -> (async_nats::Client, Violations) {
        let login = NatsSecurityArgs {
            nats_user: Some(user.to_string()),
            nats_password_file: Some(self.password_file(user)),
            ..Default::default()
        };
        let access = login.resolve(&self.url).expect("client settings");
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let client = within(
            10,
            "connect a test client",
            access.connect(|options| {
                options
                    .request_timeout(Some(Duration::from_secs(3)))
                    .event_callback(move |event| {
                        let tx = tx.clone();
                        async move {
                            if let async_nats::Event::ServerError(e) = event {
                                let _ = tx.send(e.to_string());
                            }
                        }
                    })
            }),
        )
        .await
        .unwrap_or_else(|e| panic!("connect as {user}: {}", logstore_protocol::chain::Chain(&e)));
        (client, Violations(rx))
    }
}

/// Server errors (permission violations) a test client receives, in order.
pub struct Violations(tokio::sync::mpsc::UnboundedReceiver<String>);

impl Violations {
    /// Waits for a permissions violation naming `subject`.
    pub async fn expect(&mut self, subject: &str) {
        let needle = format!("\"{}\"", subject.to_ascii_lowercase());
        within(
            10,
            &format!("a permissions violation for {subject}"),
            async {
                while let Some(error) = self.0.recv().await {
                    let error = error.to_ascii_lowercase();
                    if error.contains("permissions violation") && error.contains(&needle) {
                        return;
                    }
                }
                panic!("the event stream ended");
            },
        )
        .await
    }
}
