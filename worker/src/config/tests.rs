//! Unit tests of the configuration: every error names its variable on one line and shows no
//! secret; shard URLs, logins and TLS defaults are filled as documented.

use super::*;
use clap::Parser;
use logstore_protocol::nats::Login;

#[derive(Parser)]
struct Cli {
    #[command(flatten)]
    raw: RawConfig,
}

/// Ring members are stored in NATS without any password, in both connection-string forms.
#[test]
fn without_password_keeps_everything_but_the_password() {
    for (given, kept) in [
        ("postgres://u:s3cret@h:5432/db", "postgres://u@h:5432/db"),
        (
            "postgres://u@h/db?password=s3cret&sslmode=require",
            "postgres://u@h/db?sslmode=require",
        ),
        ("postgresql://h/db?password=s3cret", "postgresql://h/db"),
        ("postgres://h/db", "postgres://h/db"),
        (
            "host=h port=5432 user=u password=s3cret dbname=db",
            "host=h port=5432 user=u dbname=db",
        ),
        ("host=h password='s3 cr et' dbname=db", "host=h dbname=db"),
    ] {
        let stripped = without_password(given);
        assert_eq!(stripped, kept, "{given}");
        assert!(!stripped.contains("s3"), "{stripped}");
    }
}

/// A member learnt from the ring record gets this worker's password and TLS defaults.
#[test]
fn members_get_this_workers_password_and_tls_defaults() {
    let access = MemberAccess {
        user: None,
        password: Some("pw".into()),
        tls: vec![("sslmode", "require".to_string())],
    };
    let shard = access.shard("pg3", "postgres://u@h3/db").unwrap();
    assert_eq!(shard.name, "pg3");
    assert!(shard.url.contains("password=pw"), "{}", shard.url);
    assert!(shard.url.contains("sslmode=require"), "{}", shard.url);
    let own = access
        .shard("pg4", "postgres://u:mine@h4/db?sslmode=disable")
        .unwrap();
    assert!(!own.url.contains("password=pw"), "{}", own.url);
    assert!(
        own.url.contains("sslmode=disable") && !own.url.contains("require"),
        "{}",
        own.url
    );
    assert!(!format!("{access:?}").contains("pw"));
    let ips = access
        .shard("h5", "host=h5 port=5432 user=u dbname=db")
        .unwrap();
    assert!(ips.url.contains(" password='pw'"), "{}", ips.url);
}

/// The ring record stores neither user nor password (issue 19): every worker logs in to a
/// member as itself.
#[test]
fn without_login_keeps_neither_user_nor_password() {
    for (given, kept) in [
        (
            "postgres://postgres:s3cret@h:5432/db",
            "postgres://h:5432/db",
        ),
        ("postgres://postgres@h/db", "postgres://h/db"),
        (
            "postgres://h/db?user=postgres&password=s3cret&sslmode=require",
            "postgres://h/db?sslmode=require",
        ),
        ("postgresql://h/db?user=postgres", "postgresql://h/db"),
        ("postgres://h/db", "postgres://h/db"),
        (
            "host=h port=5432 user=postgres password=s3cret dbname=db",
            "host=h port=5432 dbname=db",
        ),
        ("host=h user='post gres' dbname=db", "host=h dbname=db"),
    ] {
        let stripped = without_login(given);
        assert_eq!(stripped, kept, "{given}");
        assert!(
            !stripped.contains("s3") && !stripped.contains('@') && !stripped.contains("user"),
            "{stripped}"
        );
    }
}

/// A member learnt from the ring record is reached with this worker's own login: the
/// user (and password) of its own first shard, whatever user the record once named.
#[test]
fn members_get_this_workers_own_login() {
    let c = raw(&[
        "--postgres-shards",
        "a=postgres://logstore_worker:pw@h1:5432/db,b=postgres://logstore_worker@h2/db",
    ])
    .validate()
    .unwrap();
    let access = &c.member_access;
    let member = access
        .shard("pg3", &without_login("postgres://postgres@h3:5432/db"))
        .unwrap();
    let parsed: tokio_postgres::Config = crate::config::conninfo::split(&member.url)
        .unwrap()
        .0
        .parse()
        .unwrap();
    assert_eq!(parsed.get_user(), Some("logstore_worker"), "{}", member.url);
    assert_eq!(parsed.get_password(), Some(&b"pw"[..]));
    assert!(!format!("{access:?}").contains("pw"));
    // The URL an operator gives `worker shards add` keeps its own user for that command.
    let given = access.shard("pg3", "postgres://postgres@h3/db").unwrap();
    let parsed: tokio_postgres::Config = crate::config::conninfo::split(&given.url)
        .unwrap()
        .0
        .parse()
        .unwrap();
    assert_eq!(parsed.get_user(), Some("postgres"));
    // POSTGRES_IPS: POSTGRES_USER, in the key=value form too.
    let c = raw(&["--postgres-ips", "h1", "--postgres-user", "w'x"])
        .validate()
        .unwrap();
    let member = c
        .member_access
        .shard(
            "h2",
            &without_login("host=h2 port=5432 user=postgres dbname=d"),
        )
        .unwrap();
    let parsed: tokio_postgres::Config = member.url.parse().unwrap();
    assert_eq!(parsed.get_user(), Some("w'x"), "{}", member.url);
}

fn raw(args: &[&str]) -> RawConfig {
    Cli::parse_from(std::iter::once("worker").chain(args.iter().copied())).raw
}

#[test]
fn shards_from_url_list() {
    let c = raw(&[
        "--postgres-shards",
        "a=postgres://u:p@h1:5432/db, b=postgres://h2/db",
    ])
    .validate()
    .unwrap();
    assert_eq!(c.shards.len(), 2);
    assert_eq!(c.shards[1].name, "b");
    assert_eq!(c.shards[1].url, "postgres://h2/db");
}

#[test]
fn shards_from_the_originals_ips() {
    let c = raw(&[
        "--postgres-ips",
        "10.0.0.1,db2",
        "--postgres-password",
        "s'x",
    ])
    .validate()
    .unwrap();
    assert_eq!(c.shards[0].name, "10.0.0.1");
    assert_eq!(
        c.shards[1].url,
        "host=db2 port=5432 user='postgres' dbname='postgres' password='s\\'x'"
    );
    assert!(c.shards[1].url.parse::<tokio_postgres::Config>().is_ok());
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

const MARKER: &str = "S3CRET-MARKER";

/// The error for `args`: it names `var`, is one line, and never shows the marker.
fn refused(args: &[&str], var: &str) -> String {
    let err = raw(args).validate().unwrap_err();
    let text = err.to_string();
    assert_eq!(err.var, var, "{args:?}: {text}");
    assert!(!text.contains('\n'), "{args:?}: {text}");
    assert!(!text.contains(MARKER), "{args:?} leaks: {text}");
    text
}

#[test]
fn shard_list_entries_must_be_single_named_urls() {
    let m = MARKER;
    for (spec, says) in [
        // A space instead of a comma: once accepted as one shard.
        (
            format!("a=postgres://u:{m}@h/db b=postgres://u:{m}@h2/db"),
            "whitespace",
        ),
        (
            format!("a=postgres://u:{m}@h/db\tb=postgres://h2/db"),
            "whitespace",
        ),
        // Two URLs glued together.
        (
            format!("a=postgres://u:{m}@h/dbpostgres://u:{m}@h2/db"),
            "more than one URL",
        ),
        // A shard missing its name, with and without an `=` in the URL.
        (format!("postgres://u:{m}@h/db"), "not name=postgres"),
        (
            format!("postgres://u:{m}@h/db?sslmode=disable"),
            "does not start with a shard name",
        ),
        (
            format!("postgres://h/db?password={m}"),
            "does not start with a shard name",
        ),
        // The key=value form is not taken from POSTGRES_SHARDS.
        (format!("a=host=h password={m}"), "whitespace"),
        (
            format!("a=password={m}"),
            "not a postgres:// or postgresql:// URL",
        ),
        (
            format!("a=mysql://u:{m}@h/db"),
            "not a postgres:// or postgresql:// URL",
        ),
        // URLs tokio-postgres refuses.
        (
            format!("a=postgres://u:{m}@h:port/db"),
            "not a PostgreSQL URL",
        ),
        (
            format!("a=postgres://h/db?password={m}&no_such_option=1"),
            "not a PostgreSQL URL",
        ),
        (
            format!("a=postgres://u:{m}@h/db,a=postgres://u:{m}@h2/db"),
            "appears twice",
        ),
        // An unescaped comma cuts the password: the first half is then refused alone.
        (
            format!("a=postgres://u:{m},{m}@h/db"),
            "not a PostgreSQL URL",
        ),
    ] {
        let text = refused(&["--postgres-shards", &spec], "POSTGRES_SHARDS");
        assert!(text.contains(says), "{spec}: {text}");
    }
}

#[test]
fn shard_errors_name_the_offending_entry_redacted() {
    let text = refused(
        &[
            "--postgres-shards",
            &format!("ok=postgres://h/db, b=postgres://u:{MARKER}@h2/db c=postgres://h3/db"),
        ],
        "POSTGRES_SHARDS",
    );
    assert!(
        text.contains(r#""b=postgres://u:***@h2/db c=postgres://h3/db""#),
        "{text}"
    );
}

#[test]
fn postgres_ips_errors_hide_credentials() {
    for ips in [
        format!("u:{MARKER}@h"),
        format!("h password={MARKER}"),
        "a/b".to_string(),
    ] {
        refused(
            &["--postgres-ips", &ips, "--postgres-password", MARKER],
            "POSTGRES_IPS",
        );
    }
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
fn tls_parameters_are_accepted_and_checked() {
    let c = raw(&[
        "--postgres-shards",
        "a=postgres://u@h/db?sslmode=verify-full&sslrootcert=/ca.pem,\
         b=postgres://u@h2/db?sslmode=require&sslcert=/c.pem&sslkey=/k.pem",
    ])
    .validate()
    .unwrap();
    assert_eq!(c.shards.len(), 2);
    for (spec, says) in [
        (
            "a=postgres://u@h/db?sslmode=verify-full",
            "needs sslrootcert",
        ),
        ("a=postgres://u@h/db?sslmode=allow", "is not disable"),
        ("a=postgres://u@h/db?sslcert=/c.pem", "without sslkey"),
    ] {
        let text = refused(&["--postgres-shards", spec], "POSTGRES_SHARDS");
        assert!(text.contains(says) && text.contains("shard a"), "{text}");
    }
}

#[test]
fn tls_settings_fill_every_shard_that_names_none() {
    let c = raw(&[
        "--postgres-shards",
        "a=postgres://u@h/db,b=postgres://u@h2/db?sslmode=disable",
        "--postgres-sslmode",
        "verify-full",
        "--postgres-sslrootcert",
        "/etc/ca.pem",
    ])
    .validate()
    .unwrap();
    let tls = |i: usize| crate::config::conninfo::split(&c.shards[i].url).unwrap().1;
    assert_eq!(tls(0).mode, crate::config::conninfo::SslMode::VerifyFull);
    assert_eq!(
        tls(0).root_cert.as_deref(),
        Some(std::path::Path::new("/etc/ca.pem"))
    );
    assert_eq!(tls(1).mode, crate::config::conninfo::SslMode::Disable);
    let c = raw(&["--postgres-ips", "h", "--postgres-sslmode", "require"])
        .validate()
        .unwrap();
    let (rest, tls) = crate::config::conninfo::split(&c.shards[0].url).unwrap();
    assert_eq!(tls.mode, crate::config::conninfo::SslMode::Require);
    assert!(rest.parse::<tokio_postgres::Config>().is_ok(), "{rest}");
    refused(
        &["--postgres-ips", "h", "--postgres-sslmode", "allow"],
        "POSTGRES_SSLMODE",
    );
    let text = refused(
        &["--postgres-ips", "h", "--postgres-sslmode", "verify-ca"],
        "POSTGRES_SSLMODE",
    );
    assert!(text.contains("needs sslrootcert"), "{text}");
}

#[test]
fn the_password_file_fills_every_url_without_a_password() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("pw");
    std::fs::write(&file, format!("{MARKER} &x\n")).unwrap();
    let file = file.to_str().unwrap();
    let c = raw(&[
        "--postgres-shards",
        "a=postgres://u@h/db,b=postgres://u:own@h2/db?sslmode=disable",
        "--postgres-password-file",
        file,
    ])
    .validate()
    .unwrap();
    let a: tokio_postgres::Config = c.shards[0].url.parse().unwrap();
    assert_eq!(a.get_password(), Some(format!("{MARKER} &x").as_bytes()));
    assert!(c.shards[1].url.contains("u:own@"), "{:?}", c.shards[1]);
    assert!(!c.shards[1].url.contains(MARKER));
    let debug = format!("{c:?}");
    assert!(
        !debug.contains(MARKER) && !debug.contains("MARKER"),
        "{debug}"
    );
    // The original's form too.
    let c = raw(&["--postgres-ips", "h", "--postgres-password-file", file])
        .validate()
        .unwrap();
    let h: tokio_postgres::Config = c.shards[0].url.parse().unwrap();
    assert_eq!(h.get_password(), Some(format!("{MARKER} &x").as_bytes()));
    // Both, a missing file, an empty one: one line naming the variable, no content.
    let text = refused(
        &[
            "--postgres-ips",
            "h",
            "--postgres-password-file",
            file,
            "--postgres-password",
            "p",
        ],
        "POSTGRES_PASSWORD_FILE",
    );
    assert!(text.contains("only one"), "{text}");
    let text = refused(
        &[
            "--postgres-ips",
            "h",
            "--postgres-password-file",
            "/nonexistent/pw",
        ],
        "POSTGRES_PASSWORD_FILE",
    );
    assert!(text.contains("/nonexistent/pw"), "{text}");
    let empty = dir.path().join("empty");
    std::fs::write(&empty, "\n").unwrap();
    refused(
        &[
            "--postgres-ips",
            "h",
            "--postgres-password-file",
            empty.to_str().unwrap(),
        ],
        "POSTGRES_PASSWORD_FILE",
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
