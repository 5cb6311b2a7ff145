//! DaemonEye's contract: every type that crosses a process boundary or is
//! persisted, how it is encoded, and the bus topics it travels on.
//!
//! Collector (`procmond`), agent, store and CLI depend on this crate and
//! on nothing of each other's to talk: the agent and the CLI link no
//! collector code.
//!
//! - [`codec`]: the header (magic, kind, version) every payload and
//!   record carries, strict decoding, and reading the previous version.
//! - [`event`]: the event envelope, the WAL record and the bus payload of
//!   process events, and stream gap markers.
//! - [`control`]: registration, heartbeats, lifecycle, RPC, store
//!   acknowledgements and tasks.
//! - [`record`]: the persisted form of a process record (the contract's
//!   own layout, converted from and to `platform::ProcessRecord`).
//! - [`api`]: the agent's status, task and alert messages.
//! - [`ids`]: client ids and the collector type.
//! - [`ecs`]: the JSON shape of events and process states (Elastic Common
//!   Schema names), for every JSON output.
//! - [`render`]: how an event is printed for people, and
//!   [`render::printable`].
//! - [`topic`]: [`Topic<T>`] and [`Rpc<Q, A>`], each bus topic bound to
//!   its payload type and publisher [`Role`], and the table of topics.
//! - [`testing`]: plausible records and events for tests and benchmarks.
#![forbid(unsafe_code)]
#![deny(missing_docs)]

pub mod api;
pub mod codec;
pub mod control;
pub mod ecs;
pub mod event;
pub mod ids;
pub mod record;
pub mod render;
pub mod testing;
pub mod topic;
pub mod yaml;

pub use codec::{Error, Kind, Message, PeerVersion, Version};
pub use topic::{Role, Rpc, Topic};
