//! Property tests of the wire codec and the topic trie: round trips, a
//! randomized decoder that must never panic, and the trie against the
//! brute-force matcher.

use daemoneye_bus::topic::matches;
use daemoneye_bus::{Frame, FrameError, Mode, Overflow, Strategy as Pick, TopicTrie, decode, encode};
use proptest::prelude::*;

fn samples() -> Vec<Frame<'static>> {
    vec![
        Frame::Hello { protocol_version: daemoneye_bus::PROTOCOL_VERSION, client_id: "procmond-1", pid: 42 },
        Frame::Welcome { protocol_version: daemoneye_bus::PROTOCOL_VERSION, max_frame: 1 << 20 },
        Frame::WelcomeAs {
            protocol_version: daemoneye_bus::PROTOCOL_VERSION,
            max_frame: 1 << 20,
            max_deliver: 16 << 20,
            client_id: "bus-1-cli-42",
        },
        Frame::Subscribe {
            sid: 7,
            pattern: "events.process.+",
            mode: Mode::Broadcast,
            overflow: Overflow::Block,
        },
        Frame::Subscribe {
            sid: 8,
            pattern: "control.collector.task.process",
            mode: Mode::Queue { group: "workers", strategy: Pick::LeastLoaded },
            overflow: Overflow::DropOldest,
        },
        Frame::Unsubscribe { sid: 7 },
        Frame::Publish { topic: "events.process.started", payload: b"abc", reply_to: None, ack_id: Some(9) },
        Frame::Deliver {
            sid: 7,
            topic: "a.b",
            payload: &[0, 255],
            reply_to: Some("direct.agent"),
            from: "procmond-1",
        },
        Frame::PubAck { ack_id: 9 },
        Frame::Error { code: daemoneye_bus::ErrorCode::Forbidden, message: "no", ack_id: Some(3) },
        Frame::Ping(1),
        Frame::Pong(1),
    ]
}

#[test]
fn every_kind_round_trips_and_partial_input_asks_for_more() {
    for f in samples() {
        let mut buf = Vec::new();
        encode(&f, &mut buf, 1 << 20).expect("encode");
        for cut in 0..buf.len() {
            assert_eq!(decode(&buf[..cut], 1 << 20), Ok(None), "{f:?} cut at {cut}");
        }
        let (g, used) = decode(&buf, 1 << 20).expect("decode").expect("whole");
        assert_eq!((g, used), (f, buf.len()));
    }
}

#[test]
fn oversize_prefix_is_refused_from_the_prefix_alone() {
    let buf = (2u32 << 20).to_le_bytes();
    assert_eq!(decode(&buf, 1 << 20), Err(FrameError::Oversize { len: 2 << 20, max: 1 << 20 }));
    let big = vec![0u8; 100];
    let mut out = Vec::new();
    let f = Frame::Publish { topic: "a", payload: &big, reply_to: None, ack_id: None };
    assert!(matches!(encode(&f, &mut out, 50), Err(FrameError::Oversize { .. })));
    assert!(out.is_empty(), "nothing is appended for a refused frame");
}

#[test]
fn unknown_kind_and_trailing_bytes_are_malformed() {
    let mut buf = 1u32.to_le_bytes().to_vec();
    buf.push(200); // no such variant
    assert!(matches!(decode(&buf, 1024), Err(FrameError::Malformed { .. })));
    let mut ok = Vec::new();
    encode(&Frame::Ping(3), &mut ok, 1024).expect("encode");
    let mut body = ok[4..].to_vec();
    body.push(0);
    let mut framed = (body.len() as u32).to_le_bytes().to_vec();
    framed.extend_from_slice(&body);
    assert!(matches!(decode(&framed, 1024), Err(FrameError::Malformed { .. })));
}

fn segment() -> impl Strategy<Value = String> {
    prop_oneof![Just("a".to_owned()), Just("b".to_owned()), Just("c".to_owned())]
}

fn pattern() -> impl Strategy<Value = String> {
    (prop::collection::vec(prop_oneof![3 => segment(), 1 => Just("+".to_owned())], 0..4), any::<bool>())
        .prop_map(|(mut segs, hash)| {
            if hash || segs.is_empty() {
                segs.push("#".into());
            }
            segs.join(".")
        })
}

proptest! {
    #[test]
    fn decoder_never_panics_on_random_or_mutated_bytes(
        bytes in prop::collection::vec(any::<u8>(), 0..64),
        which in 0usize..11,
        flips in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..6),
    ) {
        let _ = decode(&bytes, 1 << 20);
        let mut buf = Vec::new();
        encode(&samples()[which], &mut buf, 1 << 20).expect("encode");
        for (i, v) in flips {
            let at = i.index(buf.len());
            buf[at] = v;
        }
        let _ = decode(&buf, 1 << 20);
    }

    #[test]
    fn trie_agrees_with_brute_force(
        patterns in prop::collection::vec(pattern(), 1..20),
        topics in prop::collection::vec(prop::collection::vec(segment(), 1..5), 1..20),
    ) {
        let mut trie = TopicTrie::new();
        for (i, p) in patterns.iter().enumerate() {
            trie.insert(p, i).expect("valid");
        }
        for t in topics {
            let topic = t.join(".");
            let mut got = Vec::new();
            trie.for_each_match(&topic, |i| got.push(*i));
            got.sort_unstable();
            let want: Vec<usize> =
                patterns.iter().enumerate().filter(|(_, p)| matches(p, &topic)).map(|(i, _)| i).collect();
            prop_assert_eq!(got, want, "topic {}", topic);
        }
    }
}
