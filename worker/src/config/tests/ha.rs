//! Unit tests of shards on HA PostgreSQL: a URL listing several hosts (a primary and its
//! standbys) is one shard in POSTGRES_SHARDS, in `worker shards add` and in the ring record;
//! with several hosts the worker connects only to the writable one.
#![cfg(test)]

use std::time::Duration;

use tokio_postgres::config::{Host, TargetSessionAttrs};

use super::super::*;
use super::{raw, refused, MARKER};

/// What tokio-postgres makes of a shard's URL once the worker has applied its rules.
fn driver_config(url: &str) -> tokio_postgres::Config {
    let (rest, _) = conninfo::split(url).unwrap();
    let mut config: tokio_postgres::Config = rest.parse().unwrap();
    config.connect_timeout(Duration::from_secs(4));
    conninfo::for_writing(url, &mut config).unwrap();
    config
}

fn hosts(config: &tokio_postgres::Config) -> Vec<String> {
    config
        .get_hosts()
        .iter()
        .map(|host| match host {
            Host::Tcp(name) => name.clone(),
            Host::Unix(path) => path.display().to_string(),
        })
        .collect()
}

/// The report's POSTGRES_SHARDS: once refused (the comma of the host list was taken for the
/// next entry), now two shards, the first with both hosts and its parameter.
#[test]
fn a_multi_host_url_is_one_shard_in_postgres_shards() {
    let pair = "postgres://u:pw@127.0.0.1:38704,127.0.0.1:38705/logstore\
                ?target_session_attrs=read-write";
    let c = raw(&[
        "--postgres-shards",
        &format!("pg1={pair},pg2=postgres://h2/db, pg3=postgresql://a,b,c/db"),
    ])
    .validate()
    .unwrap();
    let names: Vec<&str> = c.shards.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, ["pg1", "pg2", "pg3"]);
    assert_eq!(c.shards[0].url, pair);
    let config = driver_config(&c.shards[0].url);
    assert_eq!(hosts(&config), ["127.0.0.1", "127.0.0.1"]);
    assert_eq!(config.get_ports(), [38704, 38705]);
    assert_eq!(
        config.get_target_session_attrs(),
        TargetSessionAttrs::ReadWrite
    );
    assert_eq!(hosts(&driver_config(&c.shards[2].url)), ["a", "b", "c"]);
    // `worker shards add NAME=URL` reads its argument the same way.
    let added = parse_shards(&format!("pg4={pair}")).unwrap();
    assert_eq!((added.len(), added[0].url.as_str()), (1, pair));
}

/// Several hosts without target_session_attrs: read-write (libpq's default, `any`, would take
/// a standby that answers first); one host, or `any` said outright, stays `any`; read-only is
/// refused, since the worker writes.
#[test]
fn several_hosts_mean_the_writable_one() {
    for (url, attrs) in [
        ("postgres://a,b/db", TargetSessionAttrs::ReadWrite),
        (
            "postgres://a:1,b:2/db?sslmode=disable",
            TargetSessionAttrs::ReadWrite,
        ),
        ("host=a,b port=1,2 dbname=db", TargetSessionAttrs::ReadWrite),
        ("postgres://a/db", TargetSessionAttrs::Any),
        (
            "postgres://a,b/db?target_session_attrs=any",
            TargetSessionAttrs::Any,
        ),
        (
            "host=a,b dbname=db target_session_attrs=read-write",
            TargetSessionAttrs::ReadWrite,
        ),
    ] {
        assert_eq!(
            driver_config(url).get_target_session_attrs(),
            attrs,
            "{url}"
        );
    }
    // Each host gets its share of the connect timeout, so a host that does not answer leaves
    // time for the next within the shard timeout.
    assert_eq!(
        driver_config("postgres://a,b/db").get_connect_timeout(),
        Some(&Duration::from_secs(2))
    );
    assert_eq!(
        driver_config("postgres://a/db").get_connect_timeout(),
        Some(&Duration::from_secs(4))
    );
    let text = refused(
        &[
            "--postgres-shards",
            &format!("pg1=postgres://u:{MARKER}@a,b/db?target_session_attrs=read-only"),
        ],
        "POSTGRES_SHARDS",
    );
    assert!(
        text.contains("read-only") && text.contains("shard pg1"),
        "{text}"
    );
}

/// Entries are split only at commas that start a new `name=`; what is wrong with a host list
/// is named without its password.
#[test]
fn entries_split_only_where_a_name_starts() {
    let m = MARKER;
    for (spec, says) in [
        // A URL after a host list without a name of its own.
        (
            format!("pg1=postgres://u:{m}@a,b/db,postgres://c/db"),
            "more than one URL",
        ),
        // A host list cut by an empty entry: its rest has no name.
        (
            format!("pg1=postgres://u:{m}@a,,b/db"),
            "is not name=postgres",
        ),
        (format!("pg1=postgres://u:{m}@a, b/db"), "whitespace"),
        // Ports that do not pair with the hosts.
        (
            format!("pg1=postgres://u:{m}@a:1,b:x/db"),
            "not a PostgreSQL URL",
        ),
    ] {
        let text = refused(&["--postgres-shards", &spec], "POSTGRES_SHARDS");
        assert!(text.contains(says), "{spec}: {text}");
    }
    // A password's unescaped comma no longer cuts it: the URL is whole.
    let c = raw(&["--postgres-shards", "a=postgres://u:p,q@h/db"])
        .validate()
        .unwrap();
    assert_eq!(
        driver_config(&c.shards[0].url).get_password(),
        Some(&b"p,q"[..])
    );
}

/// The ring record stores a member's URL without login: the host list and the parameters
/// stay, and every worker fills in its own login (and TLS defaults) around them.
#[test]
fn the_ring_record_keeps_the_host_list() {
    let given = format!(
        "postgres://w:{MARKER}@a:5432,b:5433/db?target_session_attrs=read-write&password={MARKER}"
    );
    let stored = without_login(&given);
    assert_eq!(
        stored,
        "postgres://a:5432,b:5433/db?target_session_attrs=read-write"
    );
    assert_eq!(
        without_password(&given),
        "postgres://w@a:5432,b:5433/db?target_session_attrs=read-write"
    );
    let access = MemberAccess {
        user: Some("logstore".into()),
        password: Some("pw".into()),
        tls: vec![("sslmode", "disable".to_string())],
    };
    let member = access.shard("pg3", &stored).unwrap();
    let config = driver_config(&member.url);
    assert_eq!(hosts(&config), ["a", "b"], "{}", member.url);
    assert_eq!(config.get_ports(), [5432, 5433]);
    assert_eq!(config.get_user(), Some("logstore"));
    assert_eq!(config.get_password(), Some(&b"pw"[..]));
    assert_eq!(config.get_dbname(), Some("db"));
    assert_eq!(
        config.get_target_session_attrs(),
        TargetSessionAttrs::ReadWrite
    );
    // The key=value form (a ring seeded from POSTGRES_IPS) holds lists too.
    let kv = access
        .shard("pg4", "host=a,b port=5432,5433 dbname=db")
        .unwrap();
    let config = driver_config(&kv.url);
    assert_eq!(hosts(&config), ["a", "b"], "{}", kv.url);
    assert_eq!(config.get_user(), Some("logstore"), "{}", kv.url);
    assert_eq!(
        config.get_target_session_attrs(),
        TargetSessionAttrs::ReadWrite
    );
}
