//! A throw-away nats-server cluster: [`CLUSTER_SIZE`] [`NatsServer`]s, each with JetStream on
//! its own store dir, its own `server_name` and client port, joined by routes on free loopback
//! ports. A node can be SIGKILLed and restarted (same port, same store: it rejoins and catches
//! up), and the cluster says which node leads a stream. Starting one costs three servers, so a
//! test binary shares one ([`shared_cluster`]), its tests taking turns.

use std::collections::BTreeSet;
use std::sync::OnceLock;
use std::thread;
use std::time::Duration;

use async_nats::jetstream;

use super::nats::{Launcher, NatsServer};
use super::ports::free_port;
use super::process::panic_message;
use super::unique_name;

/// Servers in a cluster: the smallest that keeps a majority with one of them down.
pub const CLUSTER_SIZE: usize = 3;
/// Upper bound for the cluster to elect its JetStream meta leader, and for a stream or consumer
/// to elect a leader or bring every replica up to date.
const CLUSTER_WAIT: Duration = Duration::from_secs(60);

/// A nats-server cluster of [`CLUSTER_SIZE`] nodes on loopback; dropped, it kills them all.
pub struct NatsCluster {
    nodes: Vec<NatsServer>,
    names: Vec<String>,
}

impl NatsCluster {
    /// Starts the nodes (in parallel) and returns once each greets clients; see
    /// [`NatsCluster::wait_ready`] for JetStream.
    pub fn start() -> NatsCluster {
        Self::start_launched(|_| Launcher::default())
    }

    /// [`NatsCluster::start`], each node started through `launcher(server_name)` (a wrapper
    /// script with its configuration, say): the cluster's name, listen address, routes and the
    /// node's name are given as flags after the launcher's own arguments, and so win over a
    /// configuration's.
    pub fn start_launched(launcher: impl Fn(&str) -> Launcher + Sync) -> NatsCluster {
        let cluster = unique_name("cluster");
        let mut ports = BTreeSet::new();
        while ports.len() < CLUSTER_SIZE {
            ports.insert(free_port());
        }
        let routes: Vec<String> = ports
            .iter()
            .map(|port| format!("nats://127.0.0.1:{port}"))
            .collect();
        let names: Vec<String> = (0..CLUSTER_SIZE)
            .map(|i| format!("{cluster}-n{i}"))
            .collect();
        let launchers: Vec<Launcher> = names
            .iter()
            .zip(&ports)
            .map(|(name, port)| {
                let mut node = launcher(name);
                node.args.extend(
                    [
                        "--server_name",
                        name,
                        "--cluster_name",
                        &cluster,
                        "--cluster",
                        &format!("nats://127.0.0.1:{port}"),
                        "--routes",
                        &routes.join(","),
                    ]
                    .map(String::from),
                );
                node
            })
            .collect();
        let nodes = thread::scope(|s| {
            let started: Vec<_> = launchers
                .into_iter()
                .map(|node| s.spawn(move || NatsServer::start_launched(node)))
                .collect();
            started
                .into_iter()
                .map(|node| {
                    node.join()
                        .unwrap_or_else(|p| panic!("{}", panic_message(p)))
                })
                .collect()
        });
        NatsCluster { nodes, names }
    }

    /// Every node's client URL, in node order.
    pub fn urls(&self) -> Vec<String> {
        self.nodes.iter().map(NatsServer::url).collect()
    }

    /// NATS_URL naming every node (comma-separated), `first` first.
    pub fn nats_url_from(&self, first: usize) -> String {
        let urls = self.urls();
        let mut ordered = vec![urls[first].clone()];
        ordered.extend(
            urls.iter()
                .enumerate()
                .filter(|(i, _)| *i != first)
                .map(|(_, url)| url.clone()),
        );
        ordered.join(",")
    }

    /// NATS_URL naming every node, in node order.
    pub fn nats_url(&self) -> String {
        self.nats_url_from(0)
    }

    /// Node `i`'s `server_name` (what stream and consumer info name a leader by).
    pub fn name(&self, i: usize) -> &str {
        &self.names[i]
    }

    /// The node whose `server_name` is `name`.
    pub fn index_of(&self, name: &str) -> Option<usize> {
        self.names.iter().position(|n| n == name)
    }

    /// SIGKILL node `i` (a crash: no leadership handed over), waiting until it is gone.
    pub fn kill(&mut self, i: usize) {
        self.nodes[i].kill();
    }

    /// Start node `i` again on its port and store dir; it rejoins the cluster.
    pub fn restart(&mut self, i: usize) {
        self.nodes[i].restart_as_started();
    }

    pub fn is_running(&self, i: usize) -> bool {
        self.nodes[i].is_running()
    }

    /// Restart every node that is not running (a test that failed half-way may have left one
    /// down), so the next user finds the whole cluster.
    pub fn restore(&mut self) {
        for i in 0..self.nodes.len() {
            if !self.is_running(i) {
                self.restart(i);
            }
        }
    }

    /// Node `i`'s log so far (to show when a test fails).
    pub fn log_text(&self, i: usize) -> String {
        self.nodes[i].log_text()
    }

    /// A client that knows every node (and reconnects to any of them).
    pub async fn client(&self) -> async_nats::Client {
        let urls = self.urls();
        tokio::time::timeout(
            Duration::from_secs(10),
            async_nats::ConnectOptions::new()
                .retry_on_initial_connect()
                .connect(urls.as_slice()),
        )
        .await
        .expect("connect to the NATS cluster in time")
        .expect("connect to the NATS cluster")
    }

    /// Waits until JetStream answers for the whole cluster (a meta leader is elected).
    pub async fn wait_ready(&self, client: &async_nats::Client) {
        let js = jetstream::new(client.clone());
        within_cluster_wait("the cluster's JetStream meta leader", async {
            while js.query_account().await.is_err() {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
        .await;
    }

    /// The node leading `stream` now, waiting (at most [`CLUSTER_WAIT`]) for one to be elected.
    pub async fn stream_leader(&self, client: &async_nats::Client, stream: &str) -> usize {
        let js = jetstream::new(client.clone());
        within_cluster_wait(&format!("a leader of stream {stream}"), async {
            loop {
                if let Ok(mut found) = js.get_stream(stream).await {
                    let leader = found.info().await.ok().and_then(|info| {
                        let name = info.cluster.as_ref()?.leader.clone()?;
                        self.index_of(&name)
                    });
                    if let Some(leader) = leader {
                        return leader;
                    }
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
        .await
    }

    /// Waits until `stream` and its `consumers` each have a leader and every other replica up
    /// to date, on all [`CLUSTER_SIZE`] nodes (after a restart: the node has caught up).
    pub async fn wait_current(
        &self,
        client: &async_nats::Client,
        stream: &str,
        consumers: &[&str],
    ) {
        let js = jetstream::new(client.clone());
        let what = format!("stream {stream} and consumers {consumers:?} current on every node");
        within_cluster_wait(&what, async {
            loop {
                if self.all_current(&js, stream, consumers).await {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
        .await;
    }

    async fn all_current(&self, js: &jetstream::Context, stream: &str, consumers: &[&str]) -> bool {
        let Ok(mut found) = js.get_stream(stream).await else {
            return false;
        };
        let Ok(info) = found.info().await else {
            return false;
        };
        if !current(info.cluster.as_ref()) {
            return false;
        }
        for name in consumers {
            let consumer: Result<jetstream::consumer::PullConsumer, _> =
                found.get_consumer(name).await;
            match consumer {
                Ok(mut consumer) => match consumer.info().await {
                    Ok(info) if current(info.cluster.as_ref()) => {}
                    _ => return false,
                },
                Err(_) => return false,
            }
        }
        true
    }
}

/// A leader and every other replica of the [`CLUSTER_SIZE`] up to date.
fn current(cluster: Option<&jetstream::stream::ClusterInfo>) -> bool {
    cluster.is_some_and(|c| {
        c.leader.is_some()
            && c.replicas.len() == CLUSTER_SIZE - 1
            && c.replicas.iter().all(|peer| peer.current && !peer.offline)
    })
}

async fn within_cluster_wait<T>(what: &str, future: impl std::future::Future<Output = T>) -> T {
    match tokio::time::timeout(CLUSTER_WAIT, future).await {
        Ok(value) => value,
        Err(_) => panic!("timed out after {CLUSTER_WAIT:?}: {what}"),
    }
}

/// The cluster of this test binary, started on first use; tests take turns through the lock,
/// and each should [`NatsCluster::restore`] it first. Never dropped: like [`super::shared`]'s
/// servers, its nodes die with the test process.
pub fn shared_cluster() -> &'static tokio::sync::Mutex<NatsCluster> {
    static CLUSTER: OnceLock<tokio::sync::Mutex<NatsCluster>> = OnceLock::new();
    CLUSTER.get_or_init(|| tokio::sync::Mutex::new(NatsCluster::start()))
}
