//! procmond, the process collector: the event model, the lifecycle tracker
//! (identity is `(pid, start_time)`), the command-line sanitizer, the
//! executable hasher, the collector actor, the EventBusConnector that puts
//! every event in the write-ahead log before publishing it, the RPC and
//! task services, registration and heartbeats, standalone mode and the
//! SQLite event store.
//!
//! The agent uses two parts of this library: [`control`] (the control-plane
//! messages both sides speak) and [`store`] (the SQLite event store).
#![forbid(unsafe_code)]
#![deny(missing_docs)]

pub mod actor;
pub mod checkpoint;
pub mod config;
pub mod connector;
pub mod control;
pub mod event;
pub mod hash;
pub mod kernel;
pub mod registration;
pub mod render;
pub mod rpc;
pub mod sanitize;
pub mod standalone;
pub mod store;
pub mod task;
pub mod testing;
pub mod tracker;
