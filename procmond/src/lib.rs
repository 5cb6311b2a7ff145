//! procmond, the process collector: the lifecycle tracker
//! (identity is `(pid, start_time)`), the command-line sanitizer, the
//! executable hasher, the collector actor, the EventBusConnector that puts
//! every event in the write-ahead log before publishing it, the RPC and
//! task services, registration and heartbeats, and standalone mode.
//!
//! What procmond says on the bus and writes to its WAL is defined by
//! `daemoneye-contract`; standalone mode writes through `daemoneye-store`.
//! The agent and the CLI depend on those two crates, never on this one.
#![forbid(unsafe_code)]
#![deny(missing_docs)]

pub mod actor;
pub mod checkpoint;
pub mod config;
pub mod connector;
pub mod hash;
pub mod kernel;
pub mod registration;
pub mod rpc;
pub mod sanitize;
pub mod standalone;
pub mod task;
pub mod testing;
pub mod tracker;
