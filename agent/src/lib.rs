//! daemoneye-agent hosts the event-bus broker, supervises the collectors
//! listed in `agent.yaml`, runs the loading state machine (Loading, Ready,
//! SteadyState), detects missed heartbeats and escalates, stores events and
//! runs detection rules; `daemoneye-cli` talks to it.
#![forbid(unsafe_code)]
#![deny(missing_docs)]

/// The agent's status, task and alert messages live in the contract.
pub use daemoneye_contract::api;
pub mod cli;
pub mod cli_output;
pub mod cli_tasks;
pub mod config;
pub mod daemon;
pub mod forward;
pub mod metrics;
pub mod monitor;
pub mod privsep;
/// Detection rules live with the event store.
pub use daemoneye_store::{own, rules};
pub mod supervisor;
pub mod tasks;
pub mod writer;
