//! Test logic shared by several test binaries: the worker's core behaviour, for any setup
//! that should not change it.

use std::collections::HashSet;

use async_nats::HeaderMap;
use futures::StreamExt;
use logstore_protocol::{AppendReply, QueryResponse};

use super::*;

/// The worker's core behaviour through NATS, for any setup that should not change it (the
/// shared superuser servers in core.rs, a least-privileged role in privilege.rs, TLS in
/// tls.rs): the original's format (appends and a query without reply subjects, the answer on
/// the response subject, in order); keyed appends, each key stored once however often and
/// however concurrently it is sent (also as a `Nats-Msg-Id` header), duplicates answered with
/// the original seq and ts; queries sorted by seq with ts never decreasing, paged with
/// `after`/`next` and newest first with `order: desc`; the extreme ids. Uses ids from `base`
/// to `base + 4` and `0`/`u64::MAX`, so give each call its own databases.
pub async fn core_scenarios(env: &Env, base: u64) {
    let client = env.client().await;

    // 1. The original's format: no reply subjects, the answer on the response subject.
    let mut responses = client
        .subscribe(env.subject("response"))
        .await
        .expect("subscribe to the response subject");
    let mut events = client
        .subscribe(format!("{}.{base}", env.subject("appended")))
        .await
        .expect("subscribe to the append events");
    client.flush().await.expect("flush");
    // One at a time (each stored, as its event says, before the next is sent): with several
    // workers in the queue group two plain publishes may be stored in either order.
    for log in ["a", "b"] {
        let body = serde_json::json!({ "id": base, "log": log }).to_string();
        client
            .publish(env.subject("logs"), body.into())
            .await
            .expect("publish an append");
        within(10, "the append's event", events.next())
            .await
            .expect("an append event");
    }
    let query = serde_json::json!({ "id": base }).to_string();
    client
        .publish(env.subject("query"), query.into())
        .await
        .expect("publish a query");
    let chunks = collect_chunks(&mut responses).await;
    let logs = entries(&chunks);
    assert_eq!(chunks[0].total, 2, "{chunks:?}");
    assert_eq!(
        logs.iter()
            .map(|e| (e.seq, e.log.as_str()))
            .collect::<Vec<_>>(),
        vec![(1, "a"), (2, "b")]
    );
    assert!(logs[0].ts <= logs[1].ts);
    assert!(logs[0].ts.ends_with('Z'), "{}", logs[0].ts);

    // 2. Keys: racing copies store once; later copies are duplicates with the original's
    //    seq and ts; the Nats-Msg-Id header works as a key.
    let id = base + 1;
    for round in 0..3 {
        let (key, log) = (format!("race-{round}"), format!("once {round}"));
        let replies =
            futures::future::join_all((0..5).map(|_| env.append(&client, id, &log, Some(&key))))
                .await;
        let originals: Vec<&AppendReply> = replies.iter().filter(|r| !r.duplicate).collect();
        assert_eq!(originals.len(), 1, "round {round}: {replies:?}");
        assert_eq!(originals[0].seq, round + 1, "round {round}: {replies:?}");
        for reply in &replies {
            assert_eq!((reply.seq, &reply.ts), (originals[0].seq, &originals[0].ts));
        }
    }
    let mut headers = HeaderMap::new();
    headers.insert("Nats-Msg-Id", "header-key");
    let mut seen = Vec::new();
    for _ in 0..2 {
        let reply = within(
            10,
            "append with a Nats-Msg-Id header",
            client.request_with_headers(
                env.subject("logs"),
                headers.clone(),
                append_body(id, "by header", None),
            ),
        )
        .await
        .expect("append with a Nats-Msg-Id header");
        seen.push(parse_reply(&reply.payload).expect("stored"));
    }
    assert_eq!(
        (
            seen[0].seq,
            seen[0].duplicate,
            seen[1].seq,
            seen[1].duplicate
        ),
        (4, false, 4, true)
    );

    // 3. Queries: sorted by seq, ts never decreasing, paged, and newest first.
    let id = base + 2;
    let n = 250u64;
    futures::future::join_all((0..n).map(|i| {
        let client = &client;
        async move {
            let key = format!("bulk-{i}");
            env.append(client, id, &format!("entry {i}"), Some(&key))
                .await
        }
    }))
    .await;
    let mut after = 0;
    let mut paged = Vec::new();
    loop {
        let chunks = env
            .query(
                &client,
                serde_json::json!({ "id": id, "after": after, "limit": 100 }),
            )
            .await;
        assert_eq!(chunks[0].total, n);
        paged.extend(entries(&chunks));
        match chunks.last().and_then(|c| c.next) {
            Some(next) => after = next,
            None => break,
        }
    }
    assert_eq!(
        paged.iter().map(|e| e.seq).collect::<Vec<_>>(),
        (1..=n).collect::<Vec<_>>()
    );
    assert!(paged.windows(2).all(|w| w[0].ts <= w[1].ts), "ts decreases");
    let logs: HashSet<String> = paged.iter().map(|e| e.log.clone()).collect();
    assert_eq!(logs.len() as u64, n, "every entry once");
    let newest = env
        .query(
            &client,
            serde_json::json!({ "id": id, "order": "desc", "limit": 3 }),
        )
        .await;
    assert_eq!(
        entries(&newest).iter().map(|e| e.seq).collect::<Vec<_>>(),
        [n, n - 1, n - 2]
    );

    // 4. The extreme ids.
    for id in [0, u64::MAX] {
        let reply = env.append(&client, id, &format!("log of {id}"), None).await;
        assert_eq!(reply.id, id);
        let logs = entries(&env.query_all(&client, id).await);
        assert_eq!(
            logs.last().map(|e| e.log.clone()),
            Some(format!("log of {id}"))
        );
    }
}
