//! procmond, the process collector: the lifecycle tracker
//! (identity is `(pid, start_time)`), the command-line sanitizer, the
//! executable hasher, the collector actor, the EventBusConnector that puts
//! every event in the write-ahead log before publishing it, the RPC and
//! task services, registration and heartbeats, and standalone mode.
//!
//! What procmond says on the bus and writes to its WAL is defined by
//! `daemoneye-contract`; standalone mode writes through `daemoneye-store`.
//! The agent and the CLI depend on those two crates, never on this one.
//!
//! The bus's transport is Unix sockets, so what talks to the agent (the
//! connector, registration, the RPC and task services) is built on Unix
//! only; elsewhere (Windows) procmond runs standalone until a named-pipe
//! transport exists. Everything else is portable: what differs by OS is
//! in `daemoneye-platform`.
#![forbid(unsafe_code)]
#![deny(missing_docs)]

pub mod actor;
pub mod checkpoint;
pub mod config;
#[cfg(unix)]
pub mod connector;
pub mod hash;
pub mod kernel;
#[cfg(unix)]
pub mod registration;
#[cfg(unix)]
pub mod rpc;
pub mod sanitize;
pub mod shutdown;
pub mod standalone;
pub mod task;
pub mod testing;
pub mod tracker;
