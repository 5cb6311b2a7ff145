//! daemoneye-agent hosts the event-bus broker, supervises the collectors
//! listed in `agent.yaml`, runs the loading state machine (Loading, Ready,
//! SteadyState), detects missed heartbeats and escalates, stores events and
//! runs detection rules; `daemoneye-cli` talks to it. Built so far: the
//! configuration (`config`); the rest arrives with the agent issue.
#![forbid(unsafe_code)]
#![deny(missing_docs)]

pub mod config;
