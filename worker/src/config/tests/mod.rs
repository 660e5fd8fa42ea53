//! Unit tests of the configuration: every error names its variable on one line and shows no
//! secret. The shard URLs, logins and TLS defaults: `shards.rs`; shards on HA PostgreSQL
//! (several hosts in one URL): `ha.rs`.
#![cfg(test)]

use super::*;
use clap::Parser;
use logstore_protocol::nats::Login;

mod ha;
mod shards;

#[derive(Parser)]
struct Cli {
    #[command(flatten)]
    raw: RawConfig,
}

pub(super) fn raw(args: &[&str]) -> RawConfig {
    Cli::parse_from(std::iter::once("worker").chain(args.iter().copied())).raw
}

#[test]
fn every_error_names_its_variable() {
    let cases: [(&[&str], &str); 14] = [
        (&["--postgres-ips", "h", "--intake", "kafka"], "INTAKE"),
        (
            &["--postgres-ips", "h", "--js-ordered", "maybe"],
            "JS_ORDERED",
        ),
        (
            &["--postgres-ips", "h", "--js-lease-ms", "10"],
            "JS_LEASE_MS",
        ),
        (
            &["--postgres-ips", "h", "--nats-stream", "a.b"],
            "NATS_STREAM",
        ),
        (&[], "POSTGRES_SHARDS"),
        (&["--postgres-shards", "nourl"], "POSTGRES_SHARDS"),
        (
            &["--postgres-shards", "a=x://?,a=postgres://h/d"],
            "POSTGRES_SHARDS",
        ),
        (
            &["--postgres-ips", "h", "--postgres-port", "99999"],
            "POSTGRES_PORT",
        ),
        (
            &["--postgres-ips", "h", "--metrics-addr", "nope"],
            "METRICS_ADDR",
        ),
        (
            &["--postgres-ips", "h", "--log-format", "xml"],
            "LOG_FORMAT",
        ),
        (
            &["--postgres-ips", "h", "--nats-logs-topic", "a..b"],
            "NATS_LOGS_TOPIC",
        ),
        (
            &["--postgres-shards", "a=postgres://h/db b=postgres://h/db"],
            "POSTGRES_SHARDS",
        ),
        (
            &["--postgres-ips", "h", "--metrics-addr", ":x"],
            "METRICS_ADDR",
        ),
        (
            &["--postgres-ips", "h", "--nats-url", "nats://"],
            "NATS_URL",
        ),
    ];
    for (args, var) in cases {
        let err = raw(args).validate().unwrap_err();
        assert_eq!(err.var, var, "{args:?}: {err}");
        assert!(!err.to_string().contains('\n'));
    }
}

pub(super) const MARKER: &str = "S3CRET-MARKER";

/// The error for `args`: it names `var`, is one line, and never shows the marker.
pub(super) fn refused(args: &[&str], var: &str) -> String {
    let err = raw(args).validate().unwrap_err();
    let text = err.to_string();
    assert_eq!(err.var, var, "{args:?}: {text}");
    assert!(!text.contains('\n'), "{args:?}: {text}");
    assert!(!text.contains(MARKER), "{args:?} leaks: {text}");
    text
}

#[test]
fn nats_url_errors_hide_credentials() {
    let m = MARKER;
    for url in [
        format!("nats://u:{m}@h:port"),
        format!("nats://u:{m}@h1 nats://u:{m}@h2"),
        format!("nats://a:{m}@h1,nats://b:{m}@h2"),
        format!("http://u:{m}@h"),
        format!("nats://{m}@h,,nats://h2"),
    ] {
        refused(&["--postgres-ips", "h", "--nats-url", &url], "NATS_URL");
    }
}

#[test]
fn nats_credentials_leave_the_urls() {
    let c = raw(&[
        "--postgres-ips",
        "h",
        "--nats-url",
        &format!("nats://u:{MARKER}@h1:4222, nats://h2:4222"),
    ])
    .validate()
    .unwrap();
    assert_eq!(c.nats.servers, ["nats://h1:4222", "nats://h2:4222"]);
    assert_eq!(
        c.nats.login,
        Login::UserPassword {
            user: "u".into(),
            password: MARKER.into(),
            from: "NATS_URL".into(),
        }
    );
    let c = raw(&["--postgres-ips", "h"]).validate().unwrap();
    assert_eq!(c.nats.servers, ["nats://127.0.0.1:4222"]);
    assert_eq!(c.nats.login, Login::None);
}

#[test]
fn debug_never_shows_secrets() {
    let from_urls = raw(&[
        "--postgres-shards",
        &format!("a=postgres://u:{MARKER}@h/db,b=postgres://h2/db?password={MARKER}"),
        "--nats-url",
        &format!("nats://{MARKER}@h:4222"),
        "--postgres-password",
        MARKER,
    ]);
    let from_ips = raw(&["--postgres-ips", "h1,h2", "--postgres-password", MARKER]);
    for raw in [from_urls, from_ips] {
        let debug = format!("{raw:?} {:?}", raw.validate().unwrap());
        assert!(!debug.contains(MARKER), "{debug}");
        assert!(debug.contains("***"), "{debug}");
    }
}

#[test]
fn nats_secret_files_are_read_once_and_never_shown() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("password");
    std::fs::write(&file, format!("{MARKER}\n")).unwrap();
    let path = file.display().to_string();
    let raw = raw(&[
        "--postgres-ips",
        "h",
        "--nats-user",
        "worker",
        "--nats-password-file",
        &path,
    ]);
    let config = raw.validate().unwrap();
    assert_eq!(
        config.nats.login,
        Login::UserPassword {
            user: "worker".into(),
            password: MARKER.into(),
            from: format!("NATS_PASSWORD_FILE {path}"),
        }
    );
    let debug = format!("{raw:?} {config:?}");
    assert!(!debug.contains(MARKER), "{debug}");
    assert!(debug.contains(&path), "{debug}");
    // Two logins at once, or a file that is not there: one line naming the variable.
    let err = self::raw(&[
        "--postgres-ips",
        "h",
        "--nats-url",
        &format!("nats://u:{MARKER}@h"),
        "--nats-token-file",
        &path,
    ])
    .validate()
    .unwrap_err();
    assert_eq!(err.var, "NATS_TOKEN_FILE", "{err}");
    assert!(!err.to_string().contains(MARKER), "{err}");
    refused(
        &[
            "--postgres-ips",
            "h",
            "--nats-nkey-seed-file",
            "/nonexistent/seed",
        ],
        "NATS_NKEY_SEED_FILE",
    );
}

#[test]
fn retention_is_off_unless_given_a_duration() {
    let retention = |args: &[&str]| {
        let mut all = vec!["--postgres-ips", "h"];
        all.extend_from_slice(args);
        raw(&all).validate().map(|c| c.retention)
    };
    assert_eq!(retention(&[]).unwrap(), None);
    assert_eq!(retention(&["--retention-max-age", "off"]).unwrap(), None);
    assert_eq!(
        retention(&["--retention-max-age", "30d"]).unwrap(),
        Some(Retention {
            max_age: Duration::from_secs(30 * 86_400),
            interval: Duration::from_secs(60)
        })
    );
    assert_eq!(
        retention(&[
            "--retention-max-age",
            "2h 30m",
            "--retention-interval",
            "500ms"
        ])
        .unwrap()
        .map(|r| (r.max_age, r.interval)),
        Some((Duration::from_secs(9_000), Duration::from_millis(500)))
    );
    for (args, var) in [
        (&["--retention-max-age", "30"][..], "RETENTION_MAX_AGE"),
        (&["--retention-max-age", "forever"][..], "RETENTION_MAX_AGE"),
        (&["--retention-max-age", "0s"][..], "RETENTION_MAX_AGE"),
        (
            &["--retention-max-age", "1d", "--retention-interval", "1ms"][..],
            "RETENTION_INTERVAL",
        ),
    ] {
        assert_eq!(retention(args).unwrap_err().var, var, "{args:?}");
    }
}

#[test]
fn metrics_addr_accepts_a_bare_port() {
    let addr = |value: &str| {
        raw(&["--postgres-ips", "h", "--metrics-addr", value])
            .validate()
            .map(|c| c.metrics_addr.to_string())
    };
    assert_eq!(addr(":2112").unwrap(), "0.0.0.0:2112");
    assert_eq!(addr(" 127.0.0.1:9 ").unwrap(), "127.0.0.1:9");
    assert_eq!(addr("[::1]:9").unwrap(), "[::1]:9");
    for bad in [":", ":x", ":99999", "2112", ""] {
        assert_eq!(addr(bad).unwrap_err().var, "METRICS_ADDR", "{bad:?}");
    }
}

#[test]
fn ack_wait_is_short_by_default_on_a_replicated_stream() {
    // A replicated consumer is never reset (docs/intake.md, "Why a replicated consumer is
    // never reset"): a takeover waits for ack_wait, so its default is 5 s there and 30 s with
    // one copy; a given value always wins.
    let ack_wait = |args: &[&str]| {
        let mut all = vec!["--postgres-ips", "h", "--intake", "jetstream"];
        all.extend_from_slice(args);
        match raw(&all).validate().map(|c| c.intake) {
            Ok(Intake::JetStream(js)) => Ok(js.ack_wait),
            Ok(Intake::Core) => panic!("jetstream intake was asked for"),
            Err(e) => Err(e),
        }
    };
    assert_eq!(ack_wait(&[]).unwrap(), Duration::from_secs(30));
    assert_eq!(
        ack_wait(&["--js-replicas", "3"]).unwrap(),
        Duration::from_secs(5)
    );
    let given = ["--js-replicas", "3", "--js-ack-wait-ms", "12000"];
    assert_eq!(ack_wait(&given).unwrap(), Duration::from_secs(12));
    let err = ack_wait(&["--js-ack-wait-ms", "soon"]).unwrap_err();
    assert_eq!(err.var, "JS_ACK_WAIT_MS", "{err}");
}

#[test]
fn js_replicas_is_1_to_5_for_the_stream_and_the_buckets() {
    let replicas = |args: &[&str]| {
        let mut all = vec!["--postgres-ips", "h"];
        all.extend_from_slice(args);
        raw(&all).validate().map(|c| {
            let stream = match c.intake {
                Intake::JetStream(js) => Some(js.replicas),
                Intake::Core => None,
            };
            (c.js_replicas, stream)
        })
    };
    assert_eq!(replicas(&[]).unwrap(), (1, Some(1)));
    assert_eq!(replicas(&["--js-replicas", " 3 "]).unwrap(), (3, Some(3)));
    // The KV buckets are replicated with core intake too.
    assert_eq!(
        replicas(&["--js-replicas", "5", "--intake", "core"]).unwrap(),
        (5, None)
    );
    for bad in ["0", "6", "-1", "three", ""] {
        let flag = format!("--js-replicas={bad}");
        let err = replicas(&[&flag]).unwrap_err();
        assert_eq!(err.var, "JS_REPLICAS", "{bad:?}: {err}");
    }
}
