#[path = "support/servers.rs"]
mod servers;

use servers::*;
use std::io::{BufRead, BufReader};
use std::net::TcpStream;
use std::time::Instant;

async fn select1(url: &str) -> i32 {
    let c = pg_connect(url).await;
    c.query_one("SELECT 1", &[]).await.expect("select 1").get(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shared_and_fresh_db() {
    let t = Instant::now();
    let s = shared();
    eprintln!(
        "shared started in {:?}: nats {} pg {} {}",
        t.elapsed(),
        s.nats.url(),
        s.pg[0].port(),
        s.pg[1].port()
    );
    for pg in &s.pg {
        let url = fresh_db(pg, "Smoke-Test").await;
        eprintln!("fresh db {url}");
        assert_eq!(select1(&url).await, 1);
        assert!(pg.is_running());
    }
    let u = unique_name("A-b.C");
    assert!(
        u.starts_with(&format!("a_b_c_{}_", std::process::id())),
        "{u}"
    );
}

#[tokio::test]
async fn pg_kill_restart() {
    let t = Instant::now();
    let mut pg = PgServer::start();
    eprintln!("own pg started in {:?} on {}", t.elapsed(), pg.port());
    let url = fresh_db(&pg, "kr").await;
    let c = pg_connect(&url).await;
    c.batch_execute("CREATE TABLE t (x int); INSERT INTO t VALUES (42)")
        .await
        .unwrap();
    let port = pg.port();
    let t = Instant::now();
    pg.kill();
    eprintln!("killed in {:?}", t.elapsed());
    assert!(!pg.is_running());
    assert!(c.query_one("SELECT 1", &[]).await.is_err());
    let t = Instant::now();
    pg.restart();
    eprintln!("restarted in {:?}", t.elapsed());
    assert_eq!(pg.port(), port);
    assert!(pg.is_running());
    let c = pg_connect(&url).await;
    let x: i32 = c.query_one("SELECT x FROM t", &[]).await.unwrap().get(0);
    assert_eq!(x, 42);
    pg.stop();
    assert!(!pg.is_running());
    pg.restart();
    assert_eq!(select1(&url).await, 1);
}

#[test]
fn nats_restart() {
    let mut n = NatsServer::start();
    let read_info = |port: u16| {
        let s = TcpStream::connect(("127.0.0.1", port)).unwrap();
        let mut line = String::new();
        BufReader::new(s).read_line(&mut line).unwrap();
        assert!(line.starts_with("INFO"), "{line}");
        assert!(line.contains("\"jetstream\":true"), "{line}");
    };
    read_info(n.port());
    let port = n.port();
    n.kill();
    assert!(TcpStream::connect(("127.0.0.1", port)).is_err());
    n.restart();
    read_info(n.port());
    n.stop();
    n.restart();
    assert_eq!(n.port(), port);
    assert_eq!(n.url(), format!("nats://127.0.0.1:{port}"));
    read_info(port);
}

#[test]
#[ignore]
fn hang_forever() {
    let s = shared();
    let _own = PgServer::start();
    let _n = NatsServer::start();
    eprintln!("READY {}", s.nats.port());
    std::thread::sleep(std::time::Duration::from_secs(600));
}

#[tokio::test]
async fn nats_kill_durability() {
    let mut n = NatsServer::start();
    let mut lost_total = 0;
    for round in 0..5 {
        let client = async_nats::connect(n.url()).await.unwrap();
        let js = async_nats::jetstream::new(client.clone());
        let name = format!("S{round}");
        js.get_or_create_stream(async_nats::jetstream::stream::Config {
            name: name.clone(),
            subjects: vec![format!("s{round}.>")],
            ..Default::default()
        })
        .await
        .unwrap();
        let mut acked = 0u64;
        for i in 0..200 {
            js.publish(format!("s{round}.x"), format!("m{i}").into()).await.unwrap().await.unwrap();
            acked += 1;
        }
        n.kill();
        n.restart();
        let client = async_nats::connect(n.url()).await.unwrap();
        let js = async_nats::jetstream::new(client);
        let mut st = js.get_stream(&name).await.unwrap();
        let have = st.info().await.unwrap().state.messages;
        eprintln!("round {round}: acked {acked} have {have}");
        lost_total += acked - have;
    }
    eprintln!("lost total {lost_total}");
}

#[tokio::test]
async fn pg_kill_durability() {
    let mut pg = PgServer::start();
    let url = fresh_db(&pg, "dur").await;
    pg_connect(&url).await.batch_execute("CREATE TABLE t (x int)").await.unwrap();
    for round in 0..5 {
        let c = pg_connect(&url).await;
        let mut acked = 0i64;
        for i in 0..300 {
            c.execute("INSERT INTO t VALUES ($1)", &[&i]).await.unwrap();
            acked += 1;
        }
        let before: i64 = c.query_one("SELECT count(*) FROM t", &[]).await.unwrap().get(0);
        pg.kill();
        pg.restart();
        let c = pg_connect(&url).await;
        let have: i64 = c.query_one("SELECT count(*) FROM t", &[]).await.unwrap().get(0);
        eprintln!("round {round}: acked {acked} before {before} have {have}");
        assert_eq!(before, have);
    }
}
