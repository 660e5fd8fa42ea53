//! Unit tests of the shard settings: URLs, logins, ring members and TLS defaults are filled as
//! documented, and a bad entry is named on one line without its secret.
#![cfg(test)]

use super::super::*;
use super::{raw, refused, MARKER};

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
        // An unescaped `,name=` cuts the password (a new entry starts there): the first half
        // is then refused alone, and neither half is shown.
        (
            format!("a=postgres://u:{m},b={m}@h/db"),
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
