//! Behaviour of the write-ahead log through its public API: a model-based
//! property test, torn tails cut at every byte, bit flips in sealed
//! segments, hostile length prefixes, truncation and the writer lock.

use std::fs::{self, OpenOptions};
use std::path::{Path, PathBuf};

use daemoneye_wal::{CorruptionKind, Durability, Error, Wal, WalOptions, inspect};
use proptest::prelude::*;

fn opts(segment_size: u64) -> WalOptions {
    WalOptions { segment_size, max_record_size: 4096, durability: Durability::Never }
}

fn segments(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = fs::read_dir(dir)
        .expect("read dir")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "seg"))
        .collect();
    v.sort();
    v
}

fn replay_all(wal: &Wal, from: u64) -> Vec<(u64, Vec<u8>)> {
    wal.replay_from(from).expect("replay").map(|r| r.map(|r| (r.seq, r.payload)).expect("record")).collect()
}

fn payload(i: u64, len: usize) -> Vec<u8> {
    (0..len).map(|k| (i as usize * 31 + k * 7) as u8).collect()
}

fn copy_dir(from: &Path, to: &Path) {
    fs::create_dir_all(to).expect("mkdir");
    for e in fs::read_dir(from).expect("read dir") {
        let e = e.expect("entry");
        fs::copy(e.path(), to.join(e.file_name())).expect("copy");
    }
}

#[test]
fn append_replay_reopen_round_trip() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("wal");
    let (wal, report) = Wal::open(&dir, WalOptions::default()).expect("open");
    assert!(report.is_healthy());
    assert_eq!((report.records, report.next_seq), (0, 1));
    assert_eq!(wal.append(b"one").expect("append"), 1);
    assert_eq!(wal.append_batch(&[&b"two"[..], b"three"]).expect("batch"), 2..4);
    assert_eq!(wal.append_batch::<&[u8]>(&[]).expect("empty batch"), 4..4);
    assert_eq!(wal.durable_through(), 3, "Always makes appends durable before returning");
    wal.close().expect("close");

    let (wal, report) = Wal::open(&dir, WalOptions::default()).expect("reopen");
    assert_eq!(
        (report.records, report.first_seq, report.last_seq, report.next_seq),
        (3, Some(1), Some(3), 4)
    );
    assert!(report.torn_tail.is_none());
    let got = replay_all(&wal, 0);
    assert_eq!(got, vec![(1, b"one".to_vec()), (2, b"two".to_vec()), (3, b"three".to_vec())]);
    assert_eq!(replay_all(&wal, 3), vec![(3, b"three".to_vec())]);
    assert_eq!(wal.append(b"four").expect("append"), 4);
}

#[test]
fn oversize_record_is_refused_and_nothing_is_written() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (wal, _) = Wal::open(tmp.path(), opts(1 << 20)).expect("open");
    let big = vec![0u8; 4097];
    match wal.append_batch(&[&b"ok"[..], &big]) {
        Err(Error::RecordTooLarge { len: 4097, max: 4096 }) => {}
        other => panic!("expected RecordTooLarge, got {other:?}"),
    }
    assert_eq!(wal.next_seq(), 1);
    assert!(replay_all(&wal, 0).is_empty());
}

#[test]
fn invalid_options_are_refused_with_the_range() {
    let tmp = tempfile::tempdir().expect("tempdir");
    for (o, needle) in [
        (WalOptions { segment_size: 100, ..WalOptions::default() }, "segment_size 100 is outside"),
        (WalOptions { max_record_size: 0, ..WalOptions::default() }, "max_record_size 0 is outside"),
        (
            WalOptions {
                durability: Durability::Interval(std::time::Duration::ZERO),
                ..WalOptions::default()
            },
            "non-zero interval",
        ),
    ] {
        let err = Wal::open(tmp.path(), o).expect_err("must refuse");
        assert!(err.to_string().contains(needle), "{err}");
    }
}

#[test]
fn truncate_through_deletes_sealed_segments_and_persists_the_watermark() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    let (wal, _) = Wal::open(dir, opts(4096)).expect("open");
    for i in 1..=100 {
        wal.append(&payload(i, 200)).expect("append");
    }
    let before = segments(dir).len();
    assert!(before >= 5, "200-byte records in 4 KiB segments must rotate, got {before}");
    match wal.truncate_through(101) {
        Err(Error::WatermarkAhead { requested: 101, last: 100 }) => {}
        other => panic!("expected WatermarkAhead, got {other:?}"),
    }
    wal.truncate_through(60).expect("truncate");
    assert_eq!(wal.watermark(), 60);
    let after = segments(dir).len();
    assert!(after < before, "sealed segments below the watermark are deleted ({before} -> {after})");
    let got = replay_all(&wal, 0);
    assert_eq!(got.first().map(|r| r.0), Some(61));
    assert_eq!(got.len(), 40);
    // A lower watermark is a no-op, not a step back.
    wal.truncate_through(10).expect("lower watermark");
    assert_eq!(wal.watermark(), 60);
    drop(wal);

    let (wal, report) = Wal::open(dir, opts(4096)).expect("reopen");
    assert_eq!((report.watermark, report.unacknowledged, report.next_seq), (60, 40, 101));
    assert!(report.is_healthy(), "{report}");
    assert_eq!(replay_all(&wal, 0).len(), 40);
    // Acknowledging everything still leaves the sequence moving forward.
    wal.truncate_through(100).expect("truncate all");
    drop(wal);
    let (wal, report) = Wal::open(dir, opts(4096)).expect("reopen");
    assert_eq!((report.unacknowledged, report.next_seq), (0, 101));
    assert_eq!(wal.append(b"x").expect("append"), 101);
}

#[test]
fn group_commit_from_many_threads_assigns_every_sequence_once() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let o = WalOptions { segment_size: 64 << 10, ..WalOptions::default() };
    let (wal, _) = Wal::open(tmp.path(), o).expect("open");
    let mut seqs: Vec<u64> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..4)
            .map(|t| {
                let wal = &wal;
                s.spawn(move || {
                    let mut mine = Vec::new();
                    for i in 0..200u64 {
                        let seq = wal.append(&payload(t * 1000 + i, 64)).expect("append");
                        assert!(wal.durable_through() >= seq, "Always returned before {seq} was durable");
                        mine.push(seq);
                    }
                    mine
                })
            })
            .collect();
        hs.into_iter().flat_map(|h| h.join().expect("thread")).collect()
    });
    seqs.sort_unstable();
    assert_eq!(seqs, (1..=800).collect::<Vec<_>>());
    drop(wal);
    let (wal, report) = Wal::open(tmp.path(), o).expect("reopen");
    assert_eq!(report.records, 800);
    assert!(report.is_healthy(), "{report}");
    assert_eq!(replay_all(&wal, 0).len(), 800);
}

#[test]
fn torn_tail_at_every_byte_of_the_last_record_keeps_exactly_the_complete_records() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let src = tmp.path().join("src");
    let (wal, _) = Wal::open(&src, opts(1 << 20)).expect("open");
    for i in 1..=5 {
        wal.append(&payload(i, 40)).expect("append");
    }
    drop(wal);
    let seg = segments(&src).pop().expect("a segment");
    let full = fs::metadata(&seg).expect("stat").len();
    let frame = 16 + 40;
    let last_start = full - frame;
    for cut in last_start..full {
        let dir = tmp.path().join(format!("cut{cut}"));
        copy_dir(&src, &dir);
        let seg = segments(&dir).pop().expect("segment");
        OpenOptions::new().write(true).open(&seg).expect("open").set_len(cut).expect("cut");

        let seen = inspect(&dir).expect("inspect");
        assert!(seen.is_healthy(), "cut {cut}: a torn tail is not corruption: {seen}");
        let (wal, report) = Wal::open(&dir, opts(1 << 20)).expect("open torn");
        assert_eq!(report.records, 4, "cut at {cut}");
        assert_eq!(report.next_seq, 5);
        match &report.torn_tail {
            None => assert_eq!(cut, last_start, "only a cut at the record boundary leaves no torn tail"),
            Some(t) => assert_eq!(
                (t.segment.clone(), t.offset, t.bytes),
                (seg.clone(), last_start, cut - last_start)
            ),
        }
        assert_eq!(fs::metadata(&seg).expect("stat").len(), last_start, "the tail is cut off on disk");
        let got = replay_all(&wal, 0);
        assert_eq!(got, (1..=4).map(|i| (i, payload(i, 40))).collect::<Vec<_>>());
        assert_eq!(wal.append(b"after").expect("append"), 5);
        drop(wal);
        let (_, again) = Wal::open(&dir, opts(1 << 20)).expect("reopen");
        assert!(again.torn_tail.is_none() && again.is_healthy() && again.records == 5, "{again}");
        fs::remove_dir_all(&dir).expect("cleanup");
    }
}

#[test]
fn zero_filled_tail_is_a_torn_tail() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (wal, _) = Wal::open(tmp.path(), opts(1 << 20)).expect("open");
    wal.append_batch(&[b"a", b"b"]).expect("append");
    drop(wal);
    let seg = segments(tmp.path()).pop().expect("segment");
    let len = fs::metadata(&seg).expect("stat").len();
    OpenOptions::new().write(true).open(&seg).expect("open").set_len(len + 4096).expect("extend");
    let (_, report) = Wal::open(tmp.path(), opts(1 << 20)).expect("open");
    assert_eq!(report.records, 2);
    let t = report.torn_tail.expect("torn tail");
    assert_eq!((t.offset, t.bytes), (len, 4096));
}

/// Builds a log whose first segments are sealed; returns the second
/// segment's path and the frame offsets and lengths of its records.
fn sealed_fixture(dir: &Path) -> (PathBuf, Vec<(u64, u64)>, u64) {
    let (wal, _) = Wal::open(dir, opts(4096)).expect("open");
    for i in 1..=150 {
        wal.append(&payload(i, 100 + (i as usize % 7))).expect("append");
    }
    drop(wal);
    let segs = segments(dir);
    assert!(segs.len() >= 3);
    let target = segs[1].clone();
    let first: u64 = target.file_stem().and_then(|s| s.to_str()).and_then(|s| s.parse().ok()).expect("name");
    let mut frames = Vec::new();
    let mut off = 32;
    let len = fs::metadata(&target).expect("stat").len();
    let mut seq = first;
    while off < len {
        let f = 16 + 100 + (seq as usize % 7) as u64;
        frames.push((off, f));
        off += f;
        seq += 1;
    }
    assert_eq!(off, len);
    (target, frames, 150)
}

#[test]
fn bit_flips_in_a_sealed_segment_are_reported_at_the_record_offset_and_later_records_survive() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let src = tmp.path().join("src");
    let (target, frames, total) = sealed_fixture(&src);
    let (rec_off, rec_len) = frames[2];
    let name = target.file_name().expect("name").to_owned();
    // One bit in every byte of the third record: length, checksum,
    // sequence and payload.
    for byte in rec_off..rec_off + rec_len {
        let dir = tmp.path().join(format!("flip{byte}"));
        copy_dir(&src, &dir);
        let seg = dir.join(&name);
        let mut bytes = fs::read(&seg).expect("read");
        bytes[byte as usize] ^= 1 << (byte % 8);
        fs::write(&seg, &bytes).expect("write");

        let report = inspect(&dir).expect("inspect");
        assert_eq!(report.corruptions.len(), 1, "byte {byte}: {report}");
        let c = &report.corruptions[0];
        assert_eq!(
            (c.segment.file_name(), c.offset, c.bytes),
            (Some(&*name), rec_off, rec_len),
            "byte {byte}"
        );
        assert_eq!(report.records, total - 1, "byte {byte}: every other record is recovered");
        assert!(report.torn_tail.is_none());

        let (wal, opened) = Wal::open(&dir, opts(4096)).expect("open");
        assert_eq!(opened.corruptions, report.corruptions);
        let items: Vec<_> = wal.replay_from(0).expect("replay").collect();
        let errors: Vec<_> = items.iter().filter_map(|i| i.as_ref().err()).collect();
        assert_eq!(errors.len(), 1, "byte {byte}: replay reports the damage once");
        assert!(matches!(errors[0], Error::Corrupt { offset, .. } if *offset == rec_off));
        assert_eq!(items.iter().filter(|i| i.is_ok()).count() as u64, total - 1);
        fs::remove_dir_all(&dir).expect("cleanup");
    }
}

#[test]
fn hostile_length_prefix_is_corruption_not_an_allocation() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (target, frames, total) = sealed_fixture(tmp.path());
    let mut bytes = fs::read(&target).expect("read");
    let (off, len) = frames[0];
    bytes[off as usize..off as usize + 4].copy_from_slice(&u32::MAX.to_le_bytes());
    fs::write(&target, &bytes).expect("write");
    let report = inspect(tmp.path()).expect("inspect");
    assert_eq!(report.corruptions.len(), 1, "{report}");
    let c = &report.corruptions[0];
    assert_eq!((c.offset, c.bytes), (off, len));
    assert_eq!(c.kind, CorruptionKind::LengthOverMax { len: u32::MAX, max: 4096 });
    assert_eq!(report.records, total - 1);
}

#[test]
fn damaged_sealed_header_is_reported_and_its_sequence_numbers_are_never_reused() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (target, frames, total) = sealed_fixture(tmp.path());
    let mut bytes = fs::read(&target).expect("read");
    bytes[13] ^= 0x10; // inside the salt: the header checksum fails
    fs::write(&target, &bytes).expect("write");
    let report = inspect(tmp.path()).expect("inspect");
    assert_eq!(report.corruptions.len(), 1, "{report}");
    assert!(matches!(report.corruptions[0].kind, CorruptionKind::Header(_)));
    assert_eq!(report.records, total - frames.len() as u64);
    let (wal, _) = Wal::open(tmp.path(), opts(4096)).expect("open");
    assert!(wal.next_seq() > total, "next {} must not reuse any sequence", wal.next_seq());
    assert!(target.with_extension("seg.corrupt").exists(), "the damaged segment is quarantined");
}

#[test]
fn corruption_in_the_active_segment_is_reported_and_the_segment_sealed() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (wal, _) = Wal::open(tmp.path(), opts(1 << 20)).expect("open");
    for i in 1..=10 {
        wal.append(&payload(i, 50)).expect("append");
    }
    drop(wal);
    let seg = segments(tmp.path()).pop().expect("segment");
    let mut bytes = fs::read(&seg).expect("read");
    let rec3 = 32 + 2 * 66;
    bytes[rec3 + 20] ^= 0xff;
    fs::write(&seg, &bytes).expect("write");
    let (wal, report) = Wal::open(tmp.path(), opts(1 << 20)).expect("open");
    assert_eq!(report.corruptions.len(), 1, "{report}");
    assert_eq!(report.corruptions[0].offset, rec3 as u64);
    assert!(report.torn_tail.is_none(), "damage followed by valid records is not a torn tail");
    assert_eq!(report.records, 9);
    // Appends go to a fresh segment; the damaged one is left untouched.
    assert_eq!(wal.append(b"new").expect("append"), 11);
    assert_eq!(fs::read(&seg).expect("read"), bytes);
    assert_eq!(segments(tmp.path()).len(), 2);
}

#[test]
fn second_writer_is_refused_until_the_first_closes() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (first, _) = Wal::open(tmp.path(), WalOptions::default()).expect("open");
    match Wal::open(tmp.path(), WalOptions::default()) {
        Err(e @ Error::Locked { .. }) => {
            let Error::Locked { dir, holder_pid } = &e else { unreachable!() };
            assert_eq!(dir, tmp.path());
            assert_eq!(*holder_pid, Some(std::process::id()));
            assert!(e.to_string().contains(&tmp.path().display().to_string()), "{e}");
        }
        other => panic!("expected Locked, got {other:?}"),
    }
    // Read-only inspection never needs the lock.
    assert!(inspect(tmp.path()).expect("inspect").is_healthy());
    first.close().expect("close");
    let (_second, _) = Wal::open(tmp.path(), WalOptions::default()).expect("open after close");
}

#[test]
fn interval_policy_syncs_in_the_background_and_stops_cleanly() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let o =
        WalOptions { durability: Durability::Interval(std::time::Duration::from_millis(5)), ..opts(1 << 20) };
    let (wal, _) = Wal::open(tmp.path(), o).expect("open");
    let seq = wal.append(b"x").expect("append");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    // Wait for the syncer thread to make the record durable: the condition
    // is polled, with a deadline, because the syncer has no event to wait on.
    while wal.durable_through() < seq {
        assert!(std::time::Instant::now() < deadline, "interval syncer never synced");
        std::thread::yield_now();
    }
    wal.close().expect("close joins the syncer");
}

#[derive(Debug, Clone)]
enum Op {
    Append(Vec<u8>),
    Batch(Vec<Vec<u8>>),
    /// Acknowledge a fraction (0..=255 of 255) of the unacknowledged records.
    Truncate(u8),
    Replay(u8),
    Close,
    DropAndReopen,
}

fn op() -> impl Strategy<Value = Op> {
    let bytes = || prop::collection::vec(any::<u8>(), 0..300);
    prop_oneof![
        4 => bytes().prop_map(Op::Append),
        2 => prop::collection::vec(bytes(), 0..12).prop_map(Op::Batch),
        1 => any::<u8>().prop_map(Op::Truncate),
        1 => any::<u8>().prop_map(Op::Replay),
        1 => Just(Op::Close),
        1 => Just(Op::DropAndReopen),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn log_matches_an_in_memory_model(ops in prop::collection::vec(op(), 1..80)) {
        let tmp = tempfile::tempdir().expect("tempdir");
        let o = opts(4096);
        // The model: every record ever appended (index + 1 = sequence) and
        // the watermark.
        let mut model: Vec<Vec<u8>> = Vec::new();
        let mut watermark = 0u64;
        let (mut wal, _) = Wal::open(tmp.path(), o).expect("open");
        for op in ops {
            match op {
                Op::Append(p) => {
                    let seq = wal.append(&p).expect("append");
                    model.push(p);
                    prop_assert_eq!(seq, model.len() as u64);
                }
                Op::Batch(ps) => {
                    let r = wal.append_batch(&ps).expect("batch");
                    prop_assert_eq!(r.start, model.len() as u64 + 1);
                    model.extend(ps);
                    prop_assert_eq!(r.end, model.len() as u64 + 1);
                }
                Op::Truncate(f) => {
                    let last = model.len() as u64;
                    let to = watermark + (last - watermark) * u64::from(f) / 255;
                    wal.truncate_through(to).expect("truncate");
                    watermark = watermark.max(to);
                }
                Op::Replay(f) => {
                    let from = (model.len() as u64 + 2) * u64::from(f) / 255;
                    let got = replay_all(&wal, from);
                    let start = from.max(watermark + 1);
                    let want: Vec<_> = (start..=model.len() as u64)
                        .map(|s| (s, model[s as usize - 1].clone()))
                        .collect();
                    prop_assert_eq!(got, want);
                }
                Op::Close | Op::DropAndReopen => {
                    if matches!(op, Op::Close) {
                        wal.close().expect("close");
                    } else {
                        drop(wal);
                    }
                    let (w, report) = Wal::open(tmp.path(), o).expect("reopen");
                    wal = w;
                    prop_assert!(report.is_healthy(), "{}", report);
                    prop_assert!(report.torn_tail.is_none());
                    prop_assert_eq!(report.watermark, watermark);
                    prop_assert_eq!(report.unacknowledged, model.len() as u64 - watermark);
                    prop_assert_eq!(report.next_seq, model.len() as u64 + 1);
                }
            }
            prop_assert_eq!(wal.next_seq(), model.len() as u64 + 1);
            prop_assert_eq!(wal.watermark(), watermark);
        }
        let got = replay_all(&wal, 0);
        let want: Vec<_> = (watermark + 1..=model.len() as u64).map(|s| (s, model[s as usize - 1].clone())).collect();
        prop_assert_eq!(got, want);
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    /// The decoder reads untrusted bytes: random garbage after a valid
    /// header, and random mutations of a valid segment, never panic, and
    /// every record it accepts is one that was written.
    #[test]
    fn decoder_survives_random_and_mutated_segments(
        garbage in prop::collection::vec(any::<u8>(), 0..2048),
        mutations in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..16),
        cut in any::<prop::sample::Index>(),
    ) {
        let tmp = tempfile::tempdir().expect("tempdir");
        let (wal, _) = Wal::open(tmp.path(), opts(1 << 20)).expect("open");
        let written: Vec<Vec<u8>> = (1..=20).map(|i| payload(i, (i as usize * 13) % 200)).collect();
        wal.append_batch(&written).expect("append");
        drop(wal);
        let seg = segments(tmp.path()).pop().expect("segment");
        let good = fs::read(&seg).expect("read");

        let mut bad = good.clone();
        for (at, val) in &mutations {
            let i = 32 + at.index(bad.len() - 32);
            bad[i] = *val;
        }
        bad.truncate(32 + cut.index(bad.len() - 31));
        for content in [bad, [&good[..32], &garbage[..]].concat()] {
            fs::write(&seg, &content).expect("write");
            let report = inspect(tmp.path()).expect("inspect never fails on bad content");
            prop_assert!(report.records <= 20);
            for r in daemoneye_wal::read_dir(tmp.path(), 0).expect("read").flatten() {
                prop_assert_eq!(&r.payload, &written[r.seq as usize - 1]);
            }
        }
    }
}

/// Regressions found in review: each of these lost data, reused sequence
/// numbers, reported false corruption or panicked.
mod review_regressions {
    use super::*;
    use daemoneye_wal::format::{SegmentHeader, encode_record, segment_file_name};

    #[test]
    fn segments_larger_than_the_read_chunk_are_read_whole() {
        let tmp = tempfile::tempdir().expect("tempdir");
        // Default options: one 16 MiB segment holding ~580 KB.
        let (wal, _) =
            Wal::open(tmp.path(), WalOptions { durability: Durability::Never, ..Default::default() })
                .expect("open");
        for i in 1..=5000 {
            wal.append(&payload(i, 100)).expect("append");
        }
        assert_eq!(replay_all(&wal, 0).len(), 5000, "live replay");
        drop(wal);
        let (wal, report) = Wal::open(tmp.path(), WalOptions::default()).expect("reopen");
        assert!(report.torn_tail.is_none() && report.is_healthy(), "{report}");
        assert_eq!((report.records, report.next_seq), (5000, 5001));
        assert_eq!(replay_all(&wal, 0).len(), 5000);
        drop(wal);
        // Sealed segments over the chunk size, too.
        let tmp = tempfile::tempdir().expect("tempdir");
        let o = WalOptions { segment_size: 600 << 10, ..opts(600 << 10) };
        let (wal, _) = Wal::open(tmp.path(), o).expect("open");
        for i in 1..=12_000 {
            wal.append(&payload(i, 100)).expect("append");
        }
        drop(wal);
        assert!(segments(tmp.path()).len() >= 2);
        let report = inspect(tmp.path()).expect("inspect");
        assert!(report.is_healthy() && report.torn_tail.is_none(), "{report}");
        assert_eq!(report.records, 12_000);
    }

    #[test]
    fn raising_the_max_record_size_keeps_big_records() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let small = WalOptions { max_record_size: 4096, ..WalOptions::default() };
        let (wal, _) = Wal::open(tmp.path(), small).expect("open");
        wal.append(b"small").expect("append");
        drop(wal);
        let big = WalOptions { max_record_size: 1 << 20, ..WalOptions::default() };
        let (wal, _) = Wal::open(tmp.path(), big).expect("reopen");
        assert_eq!(wal.append(&vec![7u8; 10_000]).expect("append big"), 2);
        drop(wal);
        let (wal, report) = Wal::open(tmp.path(), big).expect("reopen");
        assert!(report.torn_tail.is_none() && report.is_healthy(), "{report}");
        assert_eq!(replay_all(&wal, 0).iter().map(|r| r.1.len()).collect::<Vec<_>>(), vec![5, 10_000]);
    }

    #[test]
    fn watermark_past_the_records_on_disk_is_healthy_and_moves_on() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let (wal, _) = Wal::open(tmp.path(), opts(1 << 20)).expect("open");
        for i in 1..=100 {
            wal.append(&payload(i, 20)).expect("append");
        }
        wal.truncate_through(100).expect("ack");
        drop(wal);
        // A power cut under `Never` loses the last 50 records after they
        // were acknowledged.
        let seg = segments(tmp.path()).pop().expect("segment");
        OpenOptions::new().write(true).open(&seg).expect("open").set_len(32 + 50 * 36).expect("cut");
        let (wal, report) = Wal::open(tmp.path(), opts(1 << 20)).expect("reopen");
        assert!(report.is_healthy(), "{report}");
        assert_eq!(wal.append(b"next").expect("append"), 101, "sequence numbers move on past the watermark");
        drop(wal);
        let (wal, report) = Wal::open(tmp.path(), opts(1 << 20)).expect("reopen");
        assert!(report.is_healthy(), "an acknowledged gap is not corruption: {report}");
        assert_eq!(replay_all(&wal, 0), vec![(101, b"next".to_vec())]);
    }

    #[test]
    fn replay_racing_a_truncation_reports_no_false_damage() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let (wal, _) = Wal::open(tmp.path(), opts(4096)).expect("open");
        for i in 1..=200 {
            wal.append(&payload(i, 100)).expect("append");
        }
        let replay = wal.replay_from(0).expect("replay");
        // Everything but the tail is acknowledged and deleted under it,
        // including the segment that was active when replay began.
        for i in 201..=300 {
            wal.append(&payload(i, 100)).expect("append");
        }
        wal.truncate_through(290).expect("ack");
        let items: Vec<_> = replay.collect();
        assert!(
            items.iter().all(|i| i.is_ok()),
            "{:?}",
            items.iter().filter(|i| i.is_err()).collect::<Vec<_>>()
        );
    }

    #[test]
    fn a_live_replay_does_not_keep_the_lock_after_close() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let (wal, _) = Wal::open(tmp.path(), opts(4096)).expect("open");
        wal.append(b"x").expect("append");
        let replay = wal.replay_from(0).expect("replay");
        wal.close().expect("close");
        let (_again, _) = Wal::open(tmp.path(), opts(4096)).expect("reopen while a replay is alive");
        assert_eq!(replay.count(), 1);
    }

    #[test]
    fn extreme_values_on_disk_are_corruption_not_panics() {
        // A watermark at the end of the sequence space.
        let tmp = tempfile::tempdir().expect("tempdir");
        let (wal, _) = Wal::open(tmp.path(), opts(4096)).expect("open");
        wal.append(b"x").expect("append");
        drop(wal);
        fs::write(tmp.path().join("WATERMARK"), daemoneye_wal::format::encode_watermark(u64::MAX))
            .expect("write");
        let report = inspect(tmp.path()).expect("inspect");
        assert!(!report.is_healthy(), "{report}");

        // A segment named for the last sequence, with a damaged header.
        let tmp = tempfile::tempdir().expect("tempdir");
        fs::write(tmp.path().join(segment_file_name(u64::MAX)), [0u8; 64]).expect("write");
        let report = inspect(tmp.path()).expect("inspect");
        assert!(!report.is_healthy());

        // A valid record carrying the largest sequence number.
        let tmp = tempfile::tempdir().expect("tempdir");
        let h = SegmentHeader { salt: 9, first_seq: u64::MAX, max_record_size: 64 };
        let mut bytes = h.encode().to_vec();
        encode_record(&mut bytes, 9, u64::MAX, b"last");
        encode_record(&mut bytes, 9, u64::MAX, b"again");
        fs::write(tmp.path().join(segment_file_name(u64::MAX)), &bytes).expect("write");
        let report = inspect(tmp.path()).expect("inspect");
        assert_eq!(report.records, 0, "the writer never assigns u64::MAX: {report}");
        assert!(!report.is_healthy());
    }
}
