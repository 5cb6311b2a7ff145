//! The versioned encoding of every payload and persisted record.
//!
//! # Format
//!
//! Guarantees first: a decoder accepts a payload only when all of its
//! bytes are one value of the kind it expects, of a version it knows; it
//! never panics and never reads one kind as another.
//!
//! ```text
//! version 3 (current):  FF 44 45 FF | kind: u8 | version: u16 LE | postcard body
//! version 2:            the same header, version 2's bodies
//! version 1 (legacy):   postcard body, no header
//! ```
//!
//! - The magic `FF 44 45 FF` ("DE" between two `FF`s) marks a headed
//!   payload. A version 1 payload cannot begin with it: postcard reads
//!   `FF 44` as the varint 8831, and no version 1 kind starts with a length,
//!   an enum discriminant or a stream id that takes that value with the
//!   bytes that follow (ids are at most 64 bytes, discriminants are small,
//!   and a `StoreAck` that began so would be three bytes long with
//!   trailing bytes left over).
//! - `kind` is [`Kind`]: which type the body is. A payload of another kind
//!   is refused ([`Error::WrongKind`]), so a registration reply cannot be
//!   read as a lifecycle command, nor a gap marker as an acknowledgement.
//! - `version` is the layout of the body. Version 2's bodies have version
//!   1's layouts: the header is the only change. Version 3 appended the
//!   delivery base ([`crate::event::StreamPosition`]) to the event
//!   envelope, the gap marker and the registration, the delivery lag to
//!   the heartbeat and to the agent's status; every other kind's body is
//!   version 2's. A version newer than
//!   [`CURRENT_VERSION`] is refused with [`Error::UnknownVersion`], which
//!   says so (a newer peer or a downgrade), never a garbled value.
//! - Without the magic the payload is version 1: decoded with the layouts
//!   of the previous release, which are frozen ([`Message::decode_v1`];
//!   [`crate::event`] keeps the even older event layout it already read).
//!   A headed version 2 body is read with [`Message::decode_v2`] (the
//!   frozen version 2 layout of the kinds version 3 changed); what version
//!   3 added is then absent (`None`, empty), and each reader documents
//!   what it does without it.
//! - The body is postcard, and decoding is strict: bytes left over after
//!   the value are an error ([`Error::TrailingBytes`]), for both versions.
//!
//! Changing a body's layout is a version bump: the old layout is copied
//! into a frozen struct that [`Message::decode_v1`] (or its successor,
//! [`Message::decode_v2`]) converts from, and [`Message::encode_body`]
//! converts to for an older peer, and `tests/src/frozen_v1.rs` keeps the previous
//! release's types verbatim for the skew tests.
//!
//! # Peers one version apart
//!
//! Readers take both versions, so a current agent reads an old
//! collector's events, heartbeats and registrations, an old WAL and an
//! old store. Writers answer in the version they were spoken to
//! ([`Version::of`] a request, then [`encode_as`]): the agent replies to
//! a version 1 registration in version 1, acknowledges a stream in the
//! version its events came in, and sends lifecycle commands and RPCs to a
//! collector in the version that collector registered with (broadcasts
//! and tasks, which reach several collectors, in the oldest version among
//! the registered ones).
//!
//! The other way round, a current collector and an agent of the previous
//! release: the collector registers in the current version; the old agent
//! cannot read it and rejects it with a headerless (version 1) answer, so
//! the collector registers again at once in version 1 and from then on
//! writes version 1 to that agent: heartbeats, answers, and its events,
//! whose WAL records (always the current version) are re-encoded as they
//! are published. Each registration (after a reconnection, say) tries the
//! current version first, so an upgraded agent is spoken to in it. What
//! the old agent sends (acknowledgements, commands) is version 1, which
//! the collector reads. The cost is one refused registration per
//! registration, logged by the old agent.

use std::sync::Arc;
use std::sync::atomic::{AtomicU16, Ordering};

use serde::Serialize;
use serde::de::DeserializeOwned;

/// The magic that opens every headed payload and record.
pub const MAGIC: [u8; 4] = [0xFF, 0x44, 0x45, 0xFF];

/// The length of the header: magic, kind, version.
pub const HEADER_LEN: usize = 7;

/// The version this build writes.
pub const CURRENT_VERSION: u16 = 3;

/// The first headed version (bodies of version 1's layouts).
pub const V2_VERSION: u16 = 2;

/// The headerless layouts of the previous release.
pub const LEGACY_VERSION: u16 = 1;

/// A contract version this build can read and write.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Version {
    /// Headerless postcard of the previous release.
    V1,
    /// Header, then postcard: version 1's layouts.
    V2,
    /// Header, then postcard: the delivery base and lag appended.
    V3,
}

impl Version {
    /// The version this build writes by default.
    pub const CURRENT: Version = Version::V3;

    /// The number on the wire.
    pub fn number(self) -> u16 {
        match self {
            Version::V1 => LEGACY_VERSION,
            Version::V2 => V2_VERSION,
            Version::V3 => CURRENT_VERSION,
        }
    }

    /// The version of a number, if this build knows it.
    pub fn from_number(n: u16) -> Option<Version> {
        match n {
            LEGACY_VERSION => Some(Version::V1),
            V2_VERSION => Some(Version::V2),
            CURRENT_VERSION => Some(Version::V3),
            _ => None,
        }
    }

    /// The version a payload was written in, as far as its first bytes
    /// tell: `V1` without the magic, else the header's number (an unknown
    /// or cut one reads as the current version; [`decode`] checks the
    /// rest). Used to answer a peer in its own version.
    pub fn of(bytes: &[u8]) -> Version {
        if !bytes.starts_with(&MAGIC) {
            return Version::V1;
        }
        match bytes.get(5..7) {
            Some(&[lo, hi]) => Version::from_number(u16::from_le_bytes([lo, hi])).unwrap_or(Version::CURRENT),
            _ => Version::CURRENT,
        }
    }

    /// The older of two versions: what both peers read.
    pub fn min(self, other: Version) -> Version {
        std::cmp::min(self, other)
    }
}

/// The contract version a peer speaks, shared between the threads that
/// talk to it (a collector's registration learns it, its connector and
/// heartbeats write in it). Starts at [`Version::CURRENT`].
#[derive(Debug, Clone)]
pub struct PeerVersion(Arc<AtomicU16>);

impl Default for PeerVersion {
    fn default() -> Self {
        PeerVersion(Arc::new(AtomicU16::new(CURRENT_VERSION)))
    }
}

impl PeerVersion {
    /// The version to write in.
    pub fn get(&self) -> Version {
        Version::from_number(self.0.load(Ordering::Acquire)).unwrap_or(Version::CURRENT)
    }

    /// Records the version the peer was found to speak.
    pub fn set(&self, version: Version) {
        self.0.store(version.number(), Ordering::Release);
    }
}

/// Which type a payload's body is. The numbers are part of the format:
/// never reuse one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
#[non_exhaustive]
pub enum Kind {
    /// [`crate::event::EventEnvelope`]: the WAL record and bus payload.
    EventEnvelope = 1,
    /// [`crate::event::ProcessEvent`]: the store's `record` column.
    ProcessEvent = 2,
    /// [`crate::event::StreamGap`].
    StreamGap = 3,
    /// [`crate::control::LifecycleCommand`].
    LifecycleCommand = 4,
    /// [`crate::control::RegistrationMessage`].
    RegistrationMessage = 5,
    /// [`crate::control::RegistrationResponse`].
    RegistrationResponse = 6,
    /// [`crate::control::Heartbeat`].
    Heartbeat = 7,
    /// [`crate::control::RpcRequest`].
    RpcRequest = 8,
    /// [`crate::control::RpcResponse`].
    RpcResponse = 9,
    /// [`crate::control::StoreAck`].
    StoreAck = 10,
    /// [`crate::control::TaskRequest`].
    TaskRequest = 11,
    /// [`crate::control::TaskResponse`].
    TaskResponse = 12,
    /// [`crate::api::StatusRequest`].
    StatusRequest = 13,
    /// [`crate::api::AgentStatus`].
    AgentStatus = 14,
    /// [`crate::api::AgentTaskRequest`].
    AgentTaskRequest = 15,
    /// [`crate::api::AgentTaskResponse`].
    AgentTaskResponse = 16,
    /// [`crate::api::Alert`].
    Alert = 17,
}

impl Kind {
    /// The byte on the wire.
    pub fn byte(self) -> u8 {
        self as u8
    }
}

/// Why a payload or record was refused.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The payload begins with the magic but ends before the header does.
    #[error("truncated header: {len} bytes, a header is {HEADER_LEN}")]
    TruncatedHeader {
        /// The payload's length.
        len: usize,
    },
    /// The payload is of another kind than the one expected.
    #[error("wrong kind: expected {expected:?}, found kind {found}")]
    WrongKind {
        /// What the reader expected.
        expected: Kind,
        /// The kind byte found.
        found: u8,
    },
    /// The payload's version is not one this build reads: written by a
    /// newer release (or the version field is damaged).
    #[error(
        "unknown contract version {version} of {kind:?} (this build reads versions \
         {LEGACY_VERSION} to {CURRENT_VERSION}; written by a newer release?)"
    )]
    UnknownVersion {
        /// The kind.
        kind: Kind,
        /// The version found.
        version: u16,
    },
    /// The body is not a value of the kind's layout.
    #[error("malformed {kind:?} (version {version}): {source}")]
    Body {
        /// The kind.
        kind: Kind,
        /// The layout version tried.
        version: u16,
        /// postcard's reason.
        source: postcard::Error,
    },
    /// The payload came from a client that does not hold the topic's
    /// publisher role (see [`crate::topic`]).
    #[error("{from:?} may not publish on {topic} (only {role:?})")]
    WrongPublisher {
        /// The topic's pattern.
        topic: &'static str,
        /// The broker-vouched client id of the publisher.
        from: String,
        /// The role the topic requires.
        role: crate::topic::Role,
    },
    /// A value was read, and bytes were left over.
    #[error("{count} trailing bytes after a {kind:?} (version {version})")]
    TrailingBytes {
        /// The kind.
        kind: Kind,
        /// The layout version.
        version: u16,
        /// How many bytes were left.
        count: usize,
    },
}

/// A type that crosses a process boundary or is persisted.
pub trait Message: Serialize + DeserializeOwned {
    /// Its kind byte.
    const KIND: Kind;

    /// Decodes a version 1 (headerless) body. Version 1's layout is
    /// version 2's for every kind so far; a kind whose layout changes
    /// overrides this with its frozen layout.
    fn decode_v1(body: &[u8]) -> Result<Self, Error> {
        strict(Self::KIND, LEGACY_VERSION, body)
    }

    /// Decodes a headed version 2 body. Version 2's layout is version 3's
    /// for every kind version 3 did not change; a kind it changed
    /// overrides this with its frozen layout.
    fn decode_v2(body: &[u8]) -> Result<Self, Error> {
        strict(Self::KIND, V2_VERSION, body)
    }

    /// Appends the body in `version`'s layout to `out` (the header is
    /// written by [`encode_as`]). A kind whose layout changed overrides
    /// this to write its frozen layout for an older peer.
    fn encode_body(&self, version: Version, out: Vec<u8>) -> Vec<u8> {
        let _ = version;
        body(self, out)
    }
}

/// Appends `value` as postcard to `out`.
pub fn body<T: Serialize>(value: &T, out: Vec<u8>) -> Vec<u8> {
    // Serializing plain data into a Vec fails only on allocation failure.
    postcard::to_extend(value, out).unwrap_or_default()
}

/// Decodes one `T` from all of `body`: leftovers are an error.
pub fn strict<T: DeserializeOwned>(kind: Kind, version: u16, body: &[u8]) -> Result<T, Error> {
    match postcard::take_from_bytes::<T>(body) {
        Ok((value, [])) => Ok(value),
        Ok((_, rest)) => Err(Error::TrailingBytes { kind, version, count: rest.len() }),
        Err(source) => Err(Error::Body { kind, version, source }),
    }
}

/// Encodes `value` in the current version.
pub fn encode<T: Message>(value: &T) -> Vec<u8> {
    encode_as(Version::CURRENT, value)
}

/// Encodes `value` in `version` (an older peer's, see the module docs).
pub fn encode_as<T: Message>(version: Version, value: &T) -> Vec<u8> {
    let mut out = Vec::with_capacity(64);
    if version != Version::V1 {
        out.extend_from_slice(&MAGIC);
        out.push(T::KIND.byte());
        out.extend_from_slice(&version.number().to_le_bytes());
    }
    value.encode_body(version, out)
}

/// Decodes a `T` of either version (see the module docs).
pub fn decode<T: Message>(bytes: &[u8]) -> Result<T, Error> {
    decode_versioned(bytes).map(|(v, _)| v)
}

/// Decodes a `T` and says which version it came in.
pub fn decode_versioned<T: Message>(bytes: &[u8]) -> Result<(T, Version), Error> {
    if !bytes.starts_with(&MAGIC) {
        // A cut header (`FF 44` …) is reported as such, not as a body.
        if bytes.len() < MAGIC.len() && !bytes.is_empty() && MAGIC.starts_with(bytes) {
            return Err(Error::TruncatedHeader { len: bytes.len() });
        }
        return T::decode_v1(bytes).map(|v| (v, Version::V1));
    }
    let Some(header) = bytes.get(..HEADER_LEN) else {
        return Err(Error::TruncatedHeader { len: bytes.len() });
    };
    let found = header[4];
    if found != T::KIND.byte() {
        return Err(Error::WrongKind { expected: T::KIND, found });
    }
    let version = u16::from_le_bytes([header[5], header[6]]);
    match version {
        CURRENT_VERSION => strict(T::KIND, version, &bytes[HEADER_LEN..]).map(|v| (v, Version::V3)),
        V2_VERSION => T::decode_v2(&bytes[HEADER_LEN..]).map(|v| (v, Version::V2)),
        // A headed payload is never version 1 (or 0): refused as unknown.
        _ => Err(Error::UnknownVersion { kind: T::KIND, version }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::{LifecycleCommand, RegistrationResponse, RegistrationStatus, StoreAck};
    use crate::event::StreamGap;

    fn gap() -> StreamGap {
        StreamGap {
            collector_id: "c1".into(),
            stream_id: 9,
            from: 3,
            to: 4,
            reason: "damaged".into(),
            position: None,
        }
    }

    #[test]
    fn both_versions_round_trip_and_say_which_they_are() {
        let g = gap();
        let v2 = encode(&g);
        assert_eq!(&v2[..HEADER_LEN], &[0xFF, 0x44, 0x45, 0xFF, 3, 3, 0]);
        assert_eq!(decode_versioned::<StreamGap>(&v2).unwrap(), (g.clone(), Version::V3));
        let v1 = encode_as(Version::V1, &g);
        let current = postcard::to_stdvec(&g).unwrap();
        assert_eq!(v1, current[..current.len() - 1], "version 1 is plain postcard, without the position");
        assert_eq!(decode_versioned::<StreamGap>(&v1).unwrap(), (g.clone(), Version::V1));
        assert_eq!((Version::of(&v2), Version::of(&v1)), (Version::V3, Version::V1));
        // Version 2 has no position; it reads as `None`.
        let old = encode_as(Version::V2, &g);
        assert_eq!(Version::of(&old), Version::V2);
        assert_eq!(decode_versioned::<StreamGap>(&old).unwrap(), (g.clone(), Version::V2));
        let placed =
            StreamGap { position: Some(crate::event::StreamPosition { base: 3, next: 5 }), ..g.clone() };
        assert_eq!(
            decode::<StreamGap>(&encode_as(Version::V2, &placed)).unwrap(),
            g,
            "dropped for version 2"
        );
        assert_eq!(decode::<StreamGap>(&encode(&placed)).unwrap(), placed);
    }

    #[test]
    fn trailing_bytes_are_refused_in_both_versions() {
        let ack = StoreAck { stream_id: 1, through: 2 };
        for version in [Version::V1, Version::V2] {
            let mut bytes = encode_as(version, &ack);
            bytes.push(0);
            match decode::<StoreAck>(&bytes) {
                Err(Error::TrailingBytes { kind: Kind::StoreAck, count: 1, version: n }) => {
                    assert_eq!(n, version.number())
                }
                other => panic!("{version:?}: {other:?}"),
            }
        }
    }

    #[test]
    fn another_kind_is_refused_even_when_its_body_would_decode() {
        // A registration reply whose body happens to decode as a lifecycle
        // command (both start with discriminant 0) is refused by its kind.
        let reply = RegistrationResponse {
            status: RegistrationStatus::Accepted,
            message: None,
            begin_monitoring: false,
            acknowledged_through: None,
        };
        let bytes = encode(&reply);
        match decode::<LifecycleCommand>(&bytes) {
            Err(Error::WrongKind { expected: Kind::LifecycleCommand, found: 6 }) => {}
            other => panic!("{other:?}"),
        }
        let e = decode::<StoreAck>(&encode(&gap())).unwrap_err();
        assert!(matches!(e, Error::WrongKind { expected: Kind::StoreAck, found: 3 }), "{e}");
    }

    #[test]
    fn a_future_version_is_a_clear_error() {
        let mut bytes = encode(&gap());
        bytes[5..7].copy_from_slice(&4u16.to_le_bytes());
        let e = decode::<StreamGap>(&bytes).unwrap_err();
        assert!(matches!(e, Error::UnknownVersion { kind: Kind::StreamGap, version: 4 }));
        assert!(e.to_string().contains("newer release"), "{e}");
        // A headed version 1 does not exist either.
        bytes[5..7].copy_from_slice(&1u16.to_le_bytes());
        assert!(matches!(decode::<StreamGap>(&bytes), Err(Error::UnknownVersion { version: 1, .. })));
    }

    #[test]
    fn a_truncated_header_or_body_is_an_error_never_a_panic() {
        let bytes = encode(&gap());
        for len in 1..HEADER_LEN {
            match decode::<StreamGap>(&bytes[..len]) {
                Err(Error::TruncatedHeader { len: n }) => assert_eq!(n, len),
                other => panic!("{len}: {other:?}"),
            }
        }
        for len in HEADER_LEN..bytes.len() {
            assert!(
                matches!(decode::<StreamGap>(&bytes[..len]), Err(Error::Body { version: 3, .. })),
                "{len}"
            );
        }
        assert!(matches!(decode::<StreamGap>(&[]), Err(Error::Body { version: 1, .. })));
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..64)) {
            let _ = decode::<StreamGap>(&bytes);
            let _ = decode::<StoreAck>(&bytes);
            let _ = decode::<crate::event::EventEnvelope>(&bytes);
        }
    }
}
