//! Property-based fuzzing of every decoder the worker runs on bytes that arrive from NATS:
//! append bodies (single and batch), the `Nats-Msg-Id` key check, query, stats and delete
//! requests, and RFC 3339 timestamps.
//!
//! Inputs are arbitrary bytes and structured near-valid JSON: the contract's field names with
//! random values (huge, negative and float numbers, nested arrays and objects, invalid UTF-8,
//! NUL, lone surrogates, strings up to 70 KB, batches of 0..2000 entries), then sometimes cut,
//! spliced or flipped. Every decoder must return, never panic, and either accept a valid request
//! (which then re-encodes and decodes to itself) or answer an `ErrorBody` with a code a sender
//! can act on and a non-empty message. Valid requests built field by field must round-trip.
//!
//! The suite runs 64 cases per property (a few seconds). A long run takes `FUZZ_CASES`:
//!
//! ```text
//! FUZZ_CASES=20000 cargo test -p logstore-protocol --test fuzz -- --nocapture
//! ```
//!
//! A failure is shrunk to a minimal input and its seed saved in
//! `protocol/proptest-regressions/fuzz.txt`, which is committed and replayed first on every run.
//! `seed_corpus` below replays the hand-picked inputs of past findings deterministically.

use logstore_protocol::{
    check_key, AppendBody, AppendRequest, DeleteRequest, ErrorBody, ErrorCode, Limits, Order,
    QueryRequest, StatsRequest, Timestamp,
};
use proptest::collection::vec;
use proptest::prelude::*;
use proptest::sample::{select, Index};

fn cases() -> u32 {
    std::env::var("FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(64)
}

fn config() -> ProptestConfig {
    ProptestConfig {
        cases: cases(),
        ..ProptestConfig::default()
    }
}

const SMALL: Limits = Limits {
    max_log_bytes: 16,
    max_key_bytes: 4,
};

const FIELDS: &[&str] = &[
    "id",
    "log",
    "key",
    "expected_seq",
    "after",
    "before",
    "order",
    "since",
    "until",
    "limit",
    "request_id",
    "before_seq",
];

// ---------------------------------------------------------------------------------------------
// What every decoder must do with any input.
// ---------------------------------------------------------------------------------------------

fn check_error(what: &str, body: &[u8], e: &ErrorBody) {
    assert!(
        !e.message.trim().is_empty(),
        "{what}: empty error message for {:?}",
        String::from_utf8_lossy(body)
    );
    assert!(
        matches!(e.code, ErrorCode::InvalidRequest | ErrorCode::TooLarge),
        "{what}: decoding answered {:?} for {:?}",
        e.code,
        String::from_utf8_lossy(body)
    );
    assert_eq!(e.last_seq, None, "{what}: last_seq outside a conflict");
}

fn check_text(text: &str, max: usize) {
    assert!(
        text.len() <= max,
        "accepted {} bytes over {max}",
        text.len()
    );
    assert!(!text.contains('\0'), "accepted a NUL");
}

fn check_append(r: &AppendRequest, limits: &Limits) {
    check_text(&r.log, limits.max_log_bytes);
    if let Some(key) = &r.key {
        check_text(key, limits.max_key_bytes);
    }
}

/// Runs every decoder on `body` and checks the outcome.
fn check_all(body: &[u8]) {
    for (limits, max_entries) in [(Limits::default(), 1000), (SMALL, 3)] {
        match AppendBody::decode(body, &limits, max_entries) {
            Ok(AppendBody::Single(r)) => {
                check_append(&r, &limits);
                let again = serde_json::to_vec(&r).unwrap();
                assert_eq!(
                    AppendBody::decode(&again, &limits, max_entries),
                    Ok(AppendBody::Single(r))
                );
            }
            Ok(AppendBody::Batch(entries)) => {
                assert!(!entries.is_empty() && entries.len() <= max_entries);
                for r in &entries {
                    check_append(r, &limits);
                }
                let again = serde_json::to_vec(&entries).unwrap();
                assert_eq!(
                    AppendBody::decode(&again, &limits, max_entries),
                    Ok(AppendBody::Batch(entries))
                );
            }
            Err(e) => check_error("append body", body, &e),
        }
        match AppendRequest::decode(body, &limits) {
            Ok(r) => check_append(&r, &limits),
            Err(e) => check_error("append", body, &e),
        }
    }
    // Headers are text: the worker checks a `Nats-Msg-Id` as a key.
    let text = String::from_utf8_lossy(body);
    if let Err(e) = check_key(&text, &Limits::default()) {
        check_error("key header", body, &e);
    }
    match QueryRequest::decode(body) {
        Ok(q) => {
            assert_ne!(q.limit, Some(0));
            let again = serde_json::to_vec(&q).unwrap();
            assert_eq!(QueryRequest::decode(&again), Ok(q));
        }
        Err(e) => check_error("query", body, &e),
    }
    match StatsRequest::decode(body) {
        Ok(s) => assert_eq!(
            StatsRequest::decode(&serde_json::to_vec(&s).unwrap()),
            Ok(s)
        ),
        Err(e) => check_error("stats", body, &e),
    }
    match DeleteRequest::decode(body) {
        Ok(d) => assert_eq!(
            DeleteRequest::decode(&serde_json::to_vec(&d).unwrap()),
            Ok(d)
        ),
        Err(e) => check_error("delete", body, &e),
    }
    check_timestamp(&text);
}

fn check_timestamp(text: &str) {
    match Timestamp::parse(text) {
        Ok(t) => {
            let shown = t.to_string();
            assert_eq!(Timestamp::parse(&shown), Ok(t), "{text:?} shows as {shown}");
        }
        Err(e) => assert!(!e.to_string().is_empty()),
    }
}

// ---------------------------------------------------------------------------------------------
// Near-valid JSON text, as bytes (so it can hold invalid UTF-8).
// ---------------------------------------------------------------------------------------------

fn quote(s: &str) -> Vec<u8> {
    serde_json::to_vec(s).unwrap()
}

fn number() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        3 => any::<u64>().prop_map(|n| n.to_string()),
        2 => (0u64..20).prop_map(|n| n.to_string()),
        2 => any::<i64>().prop_map(|n| n.to_string()),
        1 => any::<f64>().prop_map(|f| f.to_string()),
        1 => any::<f64>().prop_map(|f| format!("{f:e}")),
        1 => (0usize..400).prop_map(|n| format!("1{}", "0".repeat(n))),
        1 => select(&[
            "18446744073709551615",
            "18446744073709551616",
            "-9223372036854775809",
            "1e400",
            "-1e400",
            "1e-400",
            "-0",
            "0.0",
            "1.0",
            "1.5",
            "1E2",
            "01",
            "-",
            "1e",
            "0x1f",
            "NaN",
            "Infinity",
            "+1",
        ][..])
        .prop_map(str::to_string),
    ]
    .prop_map(String::into_bytes)
}

/// Text shaped like an RFC 3339 timestamp, each part sometimes out of range.
fn timestamp_text() -> impl Strategy<Value = String> {
    (
        (0u32..10_000, 0u32..14, 0u32..33),
        (0u32..26, 0u32..62, 0u32..62),
        select(&["T", "t", " ", "x", ""][..]),
        prop::option::of(vec(0u8..10, 0..12)),
        select(
            &[
                "Z", "z", "+00:00", "-00:00", "+23:59", "-23:59", "+24:00", "+05:30", "", "Z ",
            ][..],
        ),
    )
        .prop_map(|((y, mo, d), (h, mi, s), sep, fraction, offset)| {
            let fraction = fraction
                .map(|f| format!(".{}", f.iter().map(|d| d.to_string()).collect::<String>()))
                .unwrap_or_default();
            format!("{y:04}-{mo:02}-{d:02}{sep}{h:02}:{mi:02}:{s:02}{fraction}{offset}")
        })
}

fn string_literal() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        3 => any::<String>().prop_map(|s| quote(&s)),
        2 => vec(prop::char::range('a', 'e'), 0..6).prop_map(|c| quote(&c.into_iter().collect::<String>())),
        2 => timestamp_text().prop_map(|t| quote(&t)),
        1 => (0usize..70_000).prop_map(|n| quote(&"x".repeat(n))),
        1 => (0usize..300).prop_map(|n| quote(&"é".repeat(n))),
        1 => vec(any::<u8>(), 0..24).prop_map(|raw| {
            let mut s = vec![b'"'];
            s.extend(raw.into_iter().filter(|b| *b != b'"' && *b != b'\\'));
            s.push(b'"');
            s
        }),
        1 => select(STRANGE_STRINGS)
        .prop_map(<[u8]>::to_vec),
    ]
}

const STRANGE_STRINGS: &[&[u8]] = &[
    br#""a\u0000b""#,
    b"\"\0\"",
    b"\"\xff\xfe\"",
    b"\"\xc3\"",
    br#""\ud800""#,
    br#""\udc00\ud800""#,
    br#""\u00""#,
    br#""\x41""#,
    br#""asc""#,
    br#""desc""#,
    br#""DESC""#,
    b"\"",
];

fn join(open: u8, items: Vec<Vec<u8>>, close: u8) -> Vec<u8> {
    let mut out = vec![open];
    for (i, item) in items.into_iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        out.extend(item);
    }
    out.push(close);
    out
}

fn object_of(fields: Vec<(Vec<u8>, Vec<u8>)>) -> Vec<u8> {
    join(
        b'{',
        fields
            .into_iter()
            .map(|(k, v)| {
                let mut f = k;
                f.push(b':');
                f.extend(v);
                f
            })
            .collect(),
        b'}',
    )
}

fn key_literal() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        4 => select(FIELDS).prop_map(quote),
        1 => string_literal(),
    ]
}

fn json_value() -> impl Strategy<Value = Vec<u8>> {
    let leaf = prop_oneof![
        4 => number(),
        3 => string_literal(),
        1 => select(&["null", "true", "false"][..]).prop_map(|s| s.as_bytes().to_vec()),
    ];
    leaf.prop_recursive(4, 64, 8, |inner| {
        prop_oneof![
            vec(inner.clone(), 0..8).prop_map(|items| join(b'[', items, b']')),
            vec((key_literal(), inner), 0..8).prop_map(object_of),
        ]
    })
}

/// An object with mostly the contract's fields, mostly numbers and strings.
fn request_object() -> impl Strategy<Value = Vec<u8>> {
    vec((key_literal(), json_value()), 0..8).prop_map(object_of)
}

/// A small object of the contract's fields with short values: big batches stay cheap.
fn cheap_object() -> impl Strategy<Value = Vec<u8>> {
    let value = prop_oneof![
        3 => number(),
        1 => vec(prop::char::range('a', 'e'), 0..6).prop_map(|c| quote(&c.into_iter().collect::<String>())),
        1 => select(STRANGE_STRINGS).prop_map(<[u8]>::to_vec),
    ];
    vec((select(FIELDS).prop_map(quote), value), 0..5).prop_map(object_of)
}

fn batch() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        4 => vec(request_object(), 0..8),
        1 => vec(cheap_object(), 0..2000),
        1 => vec(json_value(), 0..8),
    ]
    .prop_map(|items| join(b'[', items, b']'))
}

/// Sometimes damages a body: cut it, splice a byte in, overwrite a byte, or pad it.
fn mutated(body: impl Strategy<Value = Vec<u8>>) -> impl Strategy<Value = Vec<u8>> {
    (body, 0u8..8, any::<Index>(), any::<u8>()).prop_map(|(mut body, how, at, byte)| {
        let i = at.index(body.len() + 1);
        match how {
            0 => body.truncate(i),
            1 => body.insert(i, byte),
            2 if !body.is_empty() => {
                let i = at.index(body.len());
                body[i] = byte;
            }
            3 => {
                body.splice(0..0, b" \t\r\n\x0c".iter().copied());
            }
            _ => {}
        }
        body
    })
}

// ---------------------------------------------------------------------------------------------
// Valid requests, built field by field.
// ---------------------------------------------------------------------------------------------

fn text(max_chars: usize) -> impl Strategy<Value = String> {
    vec(any::<char>(), 0..max_chars).prop_map(|c| c.into_iter().filter(|c| *c != '\0').collect())
}

fn append_request() -> impl Strategy<Value = AppendRequest> {
    (
        any::<u64>(),
        prop_oneof![4 => text(64), 1 => Just("x".repeat(64 * 1024))],
        prop::option::of(text(64)),
        prop::option::of(any::<u64>()),
    )
        .prop_map(|(id, log, key, expected_seq)| AppendRequest {
            id,
            log,
            key,
            expected_seq,
        })
}

/// Instants from 0000-01-01 to 9999-12-31, the years RFC 3339 can write.
fn timestamp() -> impl Strategy<Value = Timestamp> {
    const DAY: i64 = 86_400_000_000;
    (-719_528 * DAY..2_932_897 * DAY).prop_map(Timestamp::from_micros)
}

fn query_request() -> impl Strategy<Value = QueryRequest> {
    (
        (any::<u64>(), any::<u64>(), prop::option::of(any::<u64>())),
        any::<bool>(),
        prop::option::of(timestamp()),
        prop::option::of(timestamp()),
        prop::option::of(1..=u64::MAX),
        prop::option::of(text(32)),
    )
        .prop_map(
            |((id, after, before), desc, since, until, limit, request_id)| QueryRequest {
                id,
                after,
                before,
                order: if desc { Order::Desc } else { Order::Asc },
                since,
                until,
                limit,
                request_id,
            },
        )
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn arbitrary_bytes(body in vec(any::<u8>(), 0..4096)) {
        check_all(&body);
    }

    #[test]
    fn near_valid_objects(body in mutated(request_object())) {
        check_all(&body);
    }

    #[test]
    fn near_valid_batches(body in mutated(batch())) {
        check_all(&body);
    }

    #[test]
    fn arbitrary_json(body in mutated(json_value())) {
        check_all(&body);
    }

    #[test]
    fn timestamps(text in prop_oneof![timestamp_text(), any::<String>()]) {
        check_timestamp(&text);
        check_all(&quote(&text));
        check_all(format!(r#"{{"id":1,"since":{},"until":{}}}"#,
            String::from_utf8(quote(&text)).unwrap(),
            String::from_utf8(quote(&text)).unwrap()).as_bytes());
    }

    #[test]
    fn valid_appends_round_trip(requests in vec(append_request(), 1..50)) {
        let limits = Limits::default();
        for r in &requests {
            for body in [serde_json::to_vec(r).unwrap(), serde_json::to_vec_pretty(r).unwrap()] {
                prop_assert_eq!(AppendRequest::decode(&body, &limits), Ok(r.clone()));
                prop_assert_eq!(
                    AppendBody::decode(&body, &limits, 1000),
                    Ok(AppendBody::Single(r.clone()))
                );
            }
        }
        let body = serde_json::to_vec(&requests).unwrap();
        prop_assert_eq!(AppendBody::decode(&body, &limits, 1000), Ok(AppendBody::Batch(requests)));
    }

    #[test]
    fn valid_requests_round_trip(
        query in query_request(),
        id in any::<u64>(),
        before_seq in prop::option::of(any::<u64>()),
        t in timestamp(),
    ) {
        prop_assert_eq!(QueryRequest::decode(&serde_json::to_vec(&query).unwrap()), Ok(query));
        let stats = StatsRequest { id };
        prop_assert_eq!(StatsRequest::decode(&serde_json::to_vec(&stats).unwrap()), Ok(stats));
        let delete = DeleteRequest { id, before_seq };
        prop_assert_eq!(DeleteRequest::decode(&serde_json::to_vec(&delete).unwrap()), Ok(delete));
        prop_assert_eq!(Timestamp::parse(&t.to_string()), Ok(t));
    }
}

/// Hand-picked inputs (the seed list): each runs through every decoder deterministically.
#[test]
fn seed_corpus() {
    let seeds: &[&[u8]] = &[
        b"",
        b" ",
        b"\x0c[]",
        b"[]",
        b"[[]]",
        b"{}",
        b"null",
        b"\xff",
        br#"{"id":1,"log":"a"}"#,
        br#"{"id":1,"log":"a","id":2}"#,
        br#"{"id":1,"log":"a\u0000"}"#,
        br#"{"id":1,"log":"\ud800"}"#,
        br#"{"id":1e400,"log":"a"}"#,
        br#"{"id":-0,"log":"a"}"#,
        br#"{"id":1.0,"log":"a"}"#,
        br#"{"id":18446744073709551616,"log":"a"}"#,
        br#"{"id":1,"limit":0}"#,
        br#"{"id":1,"order":[]}"#,
        br#"{"id":1,"request_id":1e400}"#,
        br#"{"id":1,"request_id":-0.0}"#,
        br#"{"id":1,"since":"0000-01-01T00:00:00+23:59"}"#,
        br#"{"id":1,"until":"9999-12-31T23:59:59.9999999-23:59"}"#,
        br#"{"id":1,"since":"2026-02-29T00:00:00Z"}"#,
        br#"{"id":1,"since":"2024-02-29T24:00:00Z"}"#,
        br#"{"id":1,"before_seq":null}"#,
        br#"[{"id":1,"log":"a"},null]"#,
    ];
    for seed in seeds {
        check_all(seed);
    }
    let deep = format!("{}{}", "[".repeat(10_000), "]".repeat(10_000));
    check_all(deep.as_bytes());
    let wide = format!("[{}]", vec![r#"{"id":1,"log":"a"}"#; 2000].join(","));
    check_all(wide.as_bytes());
}
