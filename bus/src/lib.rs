//! The local event bus that connects the agent and every collector: wire
//! frames (`u32` little-endian length plus a postcard body), dotted topics
//! with `+` and `#` wildcards, a broker on a mio reactor thread, a blocking
//! client, request/reply helpers, bounded per-subscriber queues and per-peer
//! access control. It knows nothing about processes. The implementation
//! arrives with the bus issue; this crate is an empty placeholder until then.
#![forbid(unsafe_code)]
