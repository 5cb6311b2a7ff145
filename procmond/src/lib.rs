//! procmond, the process collector: the event model, the lifecycle tracker
//! (identity is `(pid, start_time)`), the command-line sanitizer, the
//! executable hasher, the collector actor, the EventBusConnector that puts
//! every event in the write-ahead log before publishing it, the RPC service,
//! registration and heartbeats, standalone mode and the SQLite event store.
//! The implementation arrives with the procmond issue; this crate is an empty
//! placeholder until then.
#![forbid(unsafe_code)]
