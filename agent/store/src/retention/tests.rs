//! Unit tests of retention: by age and count, in chunks, counting what
//! outputs had not sent, keeping watermarks.

use super::PrunePhase;
use std::sync::Arc;

use crate::tests::*;
use crate::*;

#[test]
fn prune_by_age_deletes_old_events_and_keeps_watermarks() {
    let (_dir, mut store) = temp_store();
    store.insert_batch(&envs("c1", 0, &[1, 2, 3, 4, 5])).unwrap();
    // Observed at 1 s .. 5 s; now is 10 s; keep the last 7 s.
    let retention = Retention { max_age: Some(Duration::from_secs(7)), max_events: None };
    assert_eq!(store.prune_at(&retention, 10_000).unwrap(), 2);
    assert_eq!(seqs(&all(&store)), vec![3, 4, 5]);
    assert_eq!(store.watermark("c1", 0).unwrap(), Some(5));
    assert_eq!(store.prune_at(&retention, 10_000).unwrap(), 0);

    // The real clock: these events are from 1970.
    assert_eq!(store.prune(&retention).unwrap(), 3);
    assert_eq!(store.count().unwrap(), 0);
    assert_eq!(store.prune(&Retention::default()).unwrap(), 0);
}

#[test]
fn prune_by_count_keeps_the_newest() {
    let (_dir, mut store) = temp_store();
    store.insert_batch(&envs("c1", 0, &[1, 2, 3, 4, 5])).unwrap();
    let keep = |n| Retention { max_age: None, max_events: Some(n) };
    assert_eq!(store.prune(&keep(10)).unwrap(), 0);
    assert_eq!(store.prune(&keep(2)).unwrap(), 3);
    assert_eq!(seqs(&all(&store)), vec![4, 5]);
    assert_eq!(store.prune(&keep(0)).unwrap(), 2);
    assert_eq!(store.count().unwrap(), 0);

    // Ids are never reused, even after the table was emptied.
    store.insert_batch(&envs("c1", 0, &[6])).unwrap();
    assert!(all(&store)[0].id > 5);
}

#[test]
fn retention_counts_what_each_output_had_not_sent() {
    let (_dir, mut store) = temp_store();
    store.insert_batch(&envs("c1", 0, &[1, 2, 3, 4, 5, 6])).unwrap();
    let conn = store.connection();
    let mut behind = outputs::open_cursor(conn, "behind").unwrap();
    let mut ahead = outputs::open_cursor(conn, "ahead").unwrap();
    let ids: Vec<i64> = all(&store).iter().map(|e| e.id).collect();
    behind.events_through = ids[1];
    ahead.events_through = ids[5];
    outputs::write(conn, &behind).unwrap();
    outputs::write(conn, &ahead).unwrap();
    // The 4 oldest go: 2 of them the lagging output had not sent.
    let keep = Retention { max_age: None, max_events: Some(2) };
    assert_eq!(store.prune(&keep).unwrap(), 4);
    let rows = outputs::read(store.connection(), None).unwrap();
    let lost: Vec<(&str, u64)> = rows.iter().map(|r| (r.name.as_str(), r.lost)).collect();
    assert_eq!(lost, [("ahead", 0), ("behind", 2)]);
    // A cursor never moves back.
    behind.events_through = 0;
    outputs::write(store.connection(), &behind).unwrap();
    assert_eq!(outputs::read(store.connection(), Some("behind")).unwrap()[0].events_through, ids[1]);
    // The lag: rows above the cursor and the oldest one's time.
    let (n, oldest) = outputs::event_lag(store.connection(), ids[1]).unwrap();
    assert_eq!(n, 2);
    assert!(oldest.is_some());
    assert_eq!(outputs::event_lag(store.connection(), ids[5]).unwrap(), (0, None));
}

#[test]
fn a_prune_larger_than_a_chunk_deletes_exactly_its_rows_in_several_transactions() {
    let (_dir, mut store) = temp_store();
    let total = 25_000u64;
    let seqs_all: Vec<u64> = (1..=total).collect();
    for batch in seqs_all.chunks(5_000) {
        store.insert_batch(&envs("c1", 0, batch)).unwrap();
    }
    let commits = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = commits.clone();
    store
        .connection_mut()
        .commit_hook(Some(move || {
            counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            false
        }))
        .unwrap();
    // Observed at seq seconds; now is 20 s past the last: the age
    // phase deletes seqs 1..=12_345 (two chunks), the count phase the
    // oldest beyond 1_000 of what is left (11_655 rows: two chunks).
    let retention =
        Retention { max_age: Some(Duration::from_secs(total - 12_345 + 20)), max_events: Some(1_000) };
    let now_ms = (total + 20) * 1_000;
    assert_eq!(store.prune_at(&retention, now_ms).unwrap(), total - 1_000);
    assert_eq!(commits.load(std::sync::atomic::Ordering::Relaxed), 4);
    assert_eq!(seqs(&all(&store)), (total - 999..=total).collect::<Vec<_>>());
    assert_eq!(store.watermark("c1", 0).unwrap(), Some(total));

    // Step by step: no chunk over PRUNE_CHUNK, each its own transaction.
    store.connection_mut().commit_hook(None::<fn() -> bool>).unwrap();
    let mut pruning = Pruning::at(&Retention { max_age: None, max_events: Some(0) }, now_ms);
    let mut steps = Vec::new();
    while !pruning.is_done() {
        steps.push(store.prune_step(&mut pruning).unwrap());
    }
    assert_eq!(steps, [1_000]);
    assert_eq!((pruning.deleted(), pruning.transactions()), (1_000, 1));
    assert_eq!(store.count().unwrap(), 0);
}

#[test]
fn chunked_pruning_keeps_the_semantics_of_one_delete() {
    let (_dir, mut store) = temp_store();
    // Observed out of id order (late events, several collectors).
    let observed = |seq: u64| (seq * 7_919 % 50) * 1_000;
    let batch: Vec<EventEnvelope> = (1..=40)
        .map(|seq| {
            let mut e = env("c1", 0, seq);
            e.event.observed_unix_ms = observed(seq);
            e
        })
        .collect();
    store.insert_batch(&batch).unwrap();
    let ids: Vec<(i64, u64)> = all(&store).iter().map(|e| (e.id, e.seq)).collect();
    // Now 30 s, keep 10 s: observed before 20 s goes, then all but
    // the newest 9 ids of what is left.
    let retention = Retention { max_age: Some(Duration::from_secs(10)), max_events: Some(9) };
    let young: Vec<(i64, u64)> = ids.iter().copied().filter(|(_, seq)| observed(*seq) >= 20_000).collect();
    let expected: Vec<u64> = young[young.len() - 9..].iter().map(|(_, seq)| *seq).collect();

    let mut pruning = Pruning::at(&retention, 30_000);
    pruning.chunk = 3;
    let mut steps = Vec::new();
    let mut later = 41;
    while !pruning.is_done() {
        steps.push(store.prune_step(&mut pruning).unwrap());
        // The writer commits between chunks: rows committed during the
        // count phase are newer than its boundary and stay.
        if matches!(pruning.phase, PrunePhase::Count(Some(_))) && later < 43 {
            let mut e = env("c1", 0, later);
            e.event.observed_unix_ms = 25_000;
            store.insert_batch(&[e]).unwrap();
            later += 1;
        }
    }
    assert!(steps.iter().all(|n| *n <= 3), "{steps:?}");
    assert!(steps.len() > 5, "{steps:?}");
    assert_eq!(pruning.deleted(), 40 - 9);
    assert_eq!(pruning.deleted(), steps.iter().sum::<u64>());
    let mut kept = expected.clone();
    kept.extend([41, 42]);
    assert_eq!(seqs(&all(&store)), kept);

    // The same rows as one delete (a single chunk) would keep.
    let (_dir2, mut other) = temp_store();
    other.insert_batch(&batch).unwrap();
    let mut pruning = Pruning::at(&retention, 30_000);
    pruning.chunk = usize::MAX / 2;
    other.prune_step(&mut pruning).unwrap();
    other.prune_step(&mut pruning).unwrap();
    assert!(pruning.is_done());
    assert_eq!(pruning.transactions(), 2);
    assert_eq!(seqs(&all(&other)), expected);
}

#[test]
fn pruned_events_at_or_below_the_watermark_are_still_duplicates() {
    let (_dir, mut store) = temp_store();
    store.insert_batch(&envs("c1", 0, &[1, 2, 3])).unwrap();
    store.prune(&Retention { max_age: None, max_events: Some(0) }).unwrap();
    assert_eq!(store.count().unwrap(), 0);
    assert_eq!(store.max_seq("c1", 0).unwrap(), None);

    let outcome = store.insert_batch(&envs("c1", 0, &[2, 3, 4])).unwrap();
    assert_eq!((outcome.inserted, outcome.duplicates), (1, 2));
    assert_eq!(outcome.watermarks, vec![wm("c1", 0, 4)]);
    assert_eq!(seqs(&all(&store)), vec![4]);
}
