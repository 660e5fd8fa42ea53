//! Online resharding (docs/resharding.md, "Tests"): `worker shards add|remove|status` against
//! real NATS, real worker processes and three real PostgreSQL servers (pg1 and pg2 on the two
//! shared servers, the new pg3 on a dedicated one that can be killed). Every worker is started
//! with the OLD two-shard POSTGRES_SHARDS: the ring record in NATS KV is what they follow.
//!
//! Each test appends continuously over 2,000 objects (every append with its own key, which is
//! also its log text), while a reader keeps querying objects that move and objects that stay and
//! checks that no answer lacks an entry acknowledged before its query was sent. Once a move is
//! over (`worker shards status` exits 0), the three databases are read back: every acknowledged
//! append stored exactly once, on the object it was sent to, seqs gapless from 1, ts never
//! decreasing, each object's entries and live head row on the one shard the ring names (head
//! rows matching their logs; tombstones, `moved_to IS NOT NULL`, without entries), and 500 old
//! keys re-sent answered as duplicates without a new row. One more test holds a move at the
//! instant the ring starts routing an object to its new shard, with an append to it still
//! queued on the old one, and checks the next append stays behind it.

mod resharding;
mod support;

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use async_nats::jetstream;
use async_nats::jetstream::kv::Operation;
use futures::StreamExt;
use resharding::*;
use support::*;

// ---------------------------------------------------------------------------------------------
// The tests
// ---------------------------------------------------------------------------------------------

/// JetStream intake, 3 workers on the 2-shard configuration, appends over 2,000 objects (one
/// that moves with more than 1,200 entries, so its bulk is copied before its lock): pg3
/// added mid-load. The move finishes under load; a reader never misses a stored entry; a 4th
/// worker started during the move with the old configuration follows the new ring, and alone
/// stores the last appends correctly; afterwards every acknowledged append is on the shard the
/// 3-shard ring names, exactly once, about a third of the objects moved, and old keys are
/// duplicates.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn adding_a_shard_under_load_moves_a_third_and_keeps_every_append() {
    let world = World::new("jetstream", 300).await;
    let env = &world.env;
    let mut workers = world.start_workers(3).await;
    let client = env.client().await;
    let ledger = LedgerRef::default();
    let events = listen_for_events(env, &client, &ledger).await;
    let moving_ids = changed_owner(&OLD, &NEW);

    seed(env, &client, &ledger).await;
    // One object that moves, and that the load keeps appending to, gets more than a page
    // (1,000) of entries: its bulk is copied before its lock while appends to it go on.
    let big = mixed(&moving_ids, 1)[0];
    let js = jetstream::new(client.clone());
    within(
        120,
        "1,200 more appends to one object acknowledged",
        futures::stream::iter(0..1_200).for_each_concurrent(64, |n| {
            let (js, client, ledger) = (&js, &client, &ledger);
            async move { append_acked(env, client, js, ledger, big, &format!("bulk-{n}")).await }
        }),
    )
    .await;
    eventually(60, "the big object's entries stored", || async {
        (lock(&ledger).stored.get(&big).map_or(0, |e| e.len()) > 1_200).then_some(())
    })
    .await;
    let (code, json) = status(env).await.expect("status before the move");
    assert_eq!(code, 0, "{json}");
    assert_steady(&json, 1, &OLD);
    wait_epoch(&workers, 1).await;

    let (load, reader, moving) =
        add_pg3_under_load(&world, &client, &ledger, &moving_ids, Answers::Always, 300).await;
    let late = world.spawn_worker();
    assert_refused(
        env,
        &["add", &format!("pg3={}", world.pg3_url)],
        "pg3 is a member already",
    )
    .await;
    late.wait_ready().await;
    workers.push(late);
    let done = wait_steady(env, 60).await;
    assert_steady(&done, 2, &NEW);
    let (code, stdout, stderr) = shards_cli(env, &["status"]).await;
    assert_eq!(
        code,
        Some(0),
        "`worker shards status` once steady:\n{stdout}\n{stderr}"
    );
    moving.store(false, Ordering::Relaxed);
    let read = reader.stop().await;
    assert!(
        read.answered_while_moving >= 20,
        "the reader checked queries during the move: {read:?}"
    );
    wait_epoch(&workers, 2).await;
    wait_no_mover(&workers).await;
    let redirected = fleet_sum(&workers, "logstore_appends_redirected_total", &[])
        .await
        .expect("metrics");
    assert!(
        redirected > 0.0,
        "appends to moved objects were redirected during the move"
    );
    let bulk = fleet_sum(
        &workers,
        "logstore_move_entries_total",
        &[("phase", "bulk")],
    )
    .await
    .expect("metrics");
    assert!(
        bulk > 1_000.0,
        "the big object's bulk was copied before its lock ({bulk} entries)"
    );

    // The three told about pg3 only through the ring record leave; the 4th, never told, alone.
    let late = workers.pop().expect("the late worker");
    for worker in workers {
        assert_eq!(worker.terminate().await, Some(0));
    }
    wait_stored(&ledger, 300, "appends stored by the late worker alone").await;
    load.stop().await;

    let shards = world.all_shards();
    let placement = verify(&shards, &NEW, &ledger).await;
    assert_a_third_moved(&placement);
    resend_old_keys(env, &client, &shards, &placement, &moving_ids).await;
    events.abort();
    assert_eq!(late.terminate().await, Some(0));
}

/// Core intake, 3 workers on the 2-shard configuration, a slow move (MOVE_RATE 40): the mover
/// SIGKILLed part-way is replaced, and the move resumes and completes with the same guarantees
/// as above (and a second move is refused while it runs). Then, still under load, pg3 is
/// removed, and the worker carrying that move out is stopped with SIGTERM part-way (it
/// releases the mover's lease on the way out): its objects go back, pg3 holds no live object,
/// everything is where the 2-shard ring says, nothing lost or doubled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_mover_killed_half_way_resumes_and_then_a_shard_is_removed() {
    let world = World::new("core", 40).await;
    let env = &world.env;
    let mut workers = world.start_workers(3).await;
    let client = env.client().await;
    let ledger = LedgerRef::default();
    let moving_ids = changed_owner(&OLD, &NEW);
    let shards = world.all_shards();
    seed(env, &client, &ledger).await;

    // Adding pg3, its mover killed.
    let (load, reader, moving) =
        add_pg3_under_load(&world, &client, &ledger, &moving_ids, Answers::MayFail, 200).await;
    let pg4 = fresh_db(&world.pg3, "pg4").await;
    assert_refused(env, &["add", &format!("pg4={pg4}")], "a move is running").await;
    let (mover, moved) = eventually(40, "the mover has moved part of the objects", || async {
        let running = each_worker(&workers, "logstore_move_running", &[]).await?;
        let moved = each_worker(&workers, "logstore_move_objects", &[MOVED]).await?;
        let at = running.iter().position(|r| *r == 1.0)?;
        assert_eq!(
            running.iter().sum::<f64>(),
            1.0,
            "one mover at a time: {running:?}"
        );
        (moved[at] >= 250.0).then_some((at, moved[at]))
    })
    .await;
    assert!(
        moved < moving_ids.len() as f64,
        "the mover is killed part-way ({moved} of {} moved)",
        moving_ids.len()
    );
    workers.remove(mover).kill().await;
    let (code, json) = status(env).await.expect("status after the kill");
    assert_eq!(
        code, 3,
        "the move cannot have finished without its mover: {json}"
    );
    workers.push(world.start_worker().await);
    finish_move(env, &workers, 2, &NEW, (load, reader, moving.clone())).await;
    let placement = verify(&shards, &NEW, &ledger).await;
    assert_a_third_moved(&placement);
    resend_old_keys(env, &client, &shards, &placement, &moving_ids).await;

    // Removing pg3 under load.
    let load = start_load(env, &client, &ledger, "remove", &mixed(&moving_ids, 16));
    let reader = start_reader(
        env,
        &client,
        &ledger,
        mixed(&moving_ids, 100),
        Answers::Always,
        &moving,
    );
    wait_stored(&ledger, 200, "appends being stored before the remove").await;
    moving.store(true, Ordering::Relaxed);
    let (code, stdout, stderr) = shards_cli(env, &["remove", "pg3"]).await;
    assert_eq!(
        code,
        Some(0),
        "`worker shards remove pg3`:\n{stdout}\n{stderr}"
    );
    assert_moving(env, 3, &OLD, &NEW).await;
    // The worker carrying the remove out, stopped with SIGTERM part-way, hands it over at once:
    // its lease is released (a delete marker, or already another worker's), not left to expire.
    let mover = eventually(40, "a worker carries the remove out", || async {
        let running = each_worker(&workers, "logstore_move_running", &[]).await?;
        let moved = each_worker(&workers, "logstore_move_objects", &[MOVED]).await?;
        let at = running.iter().position(|r| *r == 1.0)?;
        (moved[at] >= 50.0).then_some(at)
    })
    .await;
    let stopped = workers.remove(mover);
    let holder = format!("pid {}", stopped.pid());
    assert_eq!(stopped.terminate().await, Some(0));
    match lease_entry(&client, &format!("move.{}", env.subject("workers"))).await {
        Some(entry) if entry.operation != Operation::Put => {}
        Some(entry) => assert_ne!(
            entry.value.as_ref(),
            holder.as_bytes(),
            "the stopped worker still holds the mover's lease"
        ),
        None => panic!("the mover's lease was left to expire, not released"),
    }
    workers.push(world.start_worker().await);
    finish_move(env, &workers, 3, &OLD, (load, reader, moving)).await;
    let placement = verify(&shards, &OLD, &ledger).await;
    let pg3 = connect_all(&shards[2..]).await;
    assert_eq!(
        count(&pg3, "SELECT count(*) FROM logs").await,
        0,
        "entries left on pg3"
    );
    assert_eq!(
        count(&pg3, "SELECT count(*) FROM objects WHERE moved_to IS NULL").await,
        0,
        "live objects left on pg3"
    );
    assert!(placement.shard_of.values().all(|shard| shard != "pg3"));
    resend_old_keys(env, &client, &shards, &placement, &moving_ids).await;
    for worker in workers {
        assert_eq!(worker.terminate().await, Some(0));
    }
}

/// Core intake: pg3's server SIGKILLed while objects move to it. The move does not finish while
/// it is down (status keeps exiting 3; the mover counts errors or makes no progress); once pg3
/// is back it completes, and nothing is lost, doubled or misplaced.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shard_down_during_a_move_pauses_it_and_nothing_is_lost() {
    let mut world = World::new("core", 100).await;
    let env = &world.env;
    let workers = world.start_workers(3).await;
    let client = env.client().await;
    let ledger = LedgerRef::default();
    let moving_ids = changed_owner(&OLD, &NEW);
    seed(env, &client, &ledger).await;

    let (load, reader, moving) =
        add_pg3_under_load(&world, &client, &ledger, &moving_ids, Answers::MayFail, 200).await;
    eventually(30, "some objects moved to pg3", || async {
        (fleet_sum(&workers, "logstore_move_objects", &[MOVED]).await? >= 50.0).then_some(())
    })
    .await;

    world.pg3.kill();
    let killed = Instant::now();
    let moved_at_kill = fleet_sum(&workers, "logstore_move_objects", &[MOVED])
        .await
        .expect("metrics");
    let fleet = &workers;
    let (errors, moved) = eventually(
        30,
        "the move paused while pg3 is down (mover errors, or no progress) for 3 s",
        || async move {
            let (code, json) = status(env).await?;
            assert_eq!(code, 3, "the move finished while pg3 was down: {json}");
            if killed.elapsed() < Duration::from_secs(3) {
                tokio::time::sleep(Duration::from_millis(200)).await;
                return None;
            }
            let errors = fleet_sum(fleet, "logstore_move_errors_total", &[]).await?;
            let moved = fleet_sum(fleet, "logstore_move_objects", &[MOVED]).await?;
            (errors > 0.0 || moved <= moved_at_kill + 2.0).then_some((errors, moved))
        },
    )
    .await;
    println!("pg3 down: {errors} mover errors, {moved_at_kill} -> {moved} objects moved");
    assert!(
        moved < moving_ids.len() as f64,
        "not everything moved before the outage"
    );

    world.pg3.restart();
    finish_move(env, &workers, 2, &NEW, (load, reader, moving)).await;
    let shards = world.all_shards();
    let placement = verify(&shards, &NEW, &ledger).await;
    assert_a_third_moved(&placement);
    resend_old_keys(env, &client, &shards, &placement, &moving_ids).await;
    let errors = fleet_sum(&workers, "logstore_move_errors_total", &[])
        .await
        .expect("metrics");
    println!("{errors} mover errors in all");
    for worker in workers {
        assert_eq!(worker.terminate().await, Some(0));
    }
}

/// JetStream ordered intake, one worker: an append to object X still queued on its old owner
/// pg1 when the ring starts routing X to pg3 (the move's `purging` step) stays ahead of the next
/// append to X (docs/resharding.md, "Routing during a move"). pg1's pipeline is held up by a
/// transaction of this test that locks another object's head row; X's own head row is locked
/// until both appends to pg1 are in the worker, so the mover moves X only then.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_append_queued_on_the_old_owner_stays_ahead_of_the_next_one() {
    let world = World::new("jetstream", 300).await;
    let env = &world.env;
    let worker = world.start_worker().await;
    let client = env.client().await;
    let js = jetstream::new(client.clone());
    let logs = env.subject("logs");
    let ring = |members| worker::ring::Ring::new(members, worker::ring::DEFAULT_VNODES);
    let (old, new) = (ring(&OLD[..]), ring(&NEW[..]));
    let on_pg1 = |to: &str| {
        (1..=resharding::OBJECTS)
            .find(|&id| old.shard_name_of(id) == "pg1" && new.shard_name_of(id) == to)
            .expect("an object for the test")
    };
    let (x, y) = (on_pg1("pg3"), on_pg1("pg1"));
    let pg1 = env.shards[0].1.clone();
    assert_eq!(env.shards[0].0, "pg1");
    let pg3 = world.pg3_url.clone();
    append_js(&js, &logs, x, "x-0", false).await;
    append_js(&js, &logs, y, "y-0", false).await;
    eventually(30, "x-0 and y-0 stored on pg1", || async {
        let stored = db_rows(&pg1, x).await.len() + db_rows(&pg1, y).await.len();
        (stored == 2).then_some(())
    })
    .await;

    // X's head row locked: the mover raises the fences, then waits for it.
    let mut hold_x = pg_connect(&pg1).await;
    let lock_x = hold_x.transaction().await.expect("begin");
    let lock = "SELECT 1 FROM objects WHERE id = $1 FOR UPDATE";
    lock_x.execute(lock, &[&(x as i64)]).await.expect("lock X");
    add_shard(env, "pg3", &world.pg3_url, 2).await;
    let fenced = pg_connect(&pg1).await;
    eventually(30, "pg1 fenced at epoch 2", || async {
        let row = fenced.query_one("SELECT epoch FROM ring_fence", &[]).await;
        (row.ok()?.get::<_, i64>(0) == 2).then_some(())
    })
    .await;
    // Y's head row locked: pg1's pipeline waits in its next transaction (y-1), and x-1 waits
    // behind it.
    let mut hold_y = pg_connect(&pg1).await;
    let lock_y = hold_y.transaction().await.expect("begin");
    lock_y.execute(lock, &[&(y as i64)]).await.expect("lock Y");
    let held = |n: f64| {
        let worker = std::slice::from_ref(&worker);
        async move {
            (fleet_sum(worker, "logstore_jetstream_held_messages", &[]).await? == n).then_some(())
        }
    };
    append_js(&js, &logs, y, "y-1", false).await;
    eventually(30, "y-1 in the worker", || held(1.0)).await;
    append_js(&js, &logs, x, "x-1", false).await;
    eventually(30, "x-1 in the worker", || held(2.0)).await;

    // X moves; the worker routes X to pg3 from now on.
    lock_x.commit().await.expect("release X");
    eventually(30, "the worker routes by the new ring", || async {
        let instances =
            logstore_protocol::discover::instances(&client, &logs, Duration::from_secs(1))
                .await
                .ok()?;
        let subject = instances.first()?.endpoint("status")?.to_string();
        let answer = client.request(subject, "".into()).await.ok()?;
        let status: logstore_protocol::status::WorkerStatus =
            serde_json::from_slice(&answer.payload).ok()?;
        let ring = status.ring?;
        (ring.epoch == 2 && ring.state.as_str() != "moving").then_some(())
    })
    .await;
    append_js(&js, &logs, x, "x-2", false).await;
    eventually(30, "x-2 taken in (queued, or stored on pg3)", || async {
        let stored = db_rows(&pg3, x).await.iter().any(|row| row.2 == "x-2");
        (stored || held(3.0).await.is_some()).then_some(())
    })
    .await;

    lock_y.commit().await.expect("release Y");
    let texts = eventually(60, "x-1 and x-2 stored on pg3", || async {
        let rows = db_rows(&pg3, x).await;
        (rows.len() == 3).then(|| rows.into_iter().map(|row| row.2).collect::<Vec<_>>())
    })
    .await;
    assert_eq!(
        texts,
        ["x-0", "x-1", "x-2"],
        "object {x}'s entries in order"
    );
    assert_eq!(worker.terminate().await, Some(0));
}
