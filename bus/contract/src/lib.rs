//! DaemonEye's contract: every type that crosses a process boundary or is
//! persisted, how it is encoded, and the bus topics it travels on.
//!
//! Collector (`procmond`), agent, store and CLI depend on this crate and
//! on nothing of each other's to talk: the agent and the CLI link no
//! collector code.
//!
//! - [`event`]: the event envelope, the WAL record and the bus payload of
//!   process events, and stream gap markers.
//! - [`control`]: registration, heartbeats, lifecycle, RPC, store
//!   acknowledgements and tasks.
//! - [`api`]: the agent's status, task and alert messages.
//! - [`ids`]: client ids and the collector type.
//! - [`render`]: how an event is printed, and [`render::printable`].
//! - [`testing`]: plausible records and events for tests and benchmarks.
#![forbid(unsafe_code)]
#![deny(missing_docs)]

pub mod api;
pub mod control;
pub mod event;
pub mod ids;
pub mod render;
pub mod testing;
