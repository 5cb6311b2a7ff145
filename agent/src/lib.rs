//! daemoneye-agent hosts the event-bus broker, supervises the collectors
//! listed in `agent.yaml`, runs the loading state machine (Loading, Ready,
//! SteadyState), detects missed heartbeats and escalates, stores events and
//! runs detection rules; `daemoneye-cli` talks to it. The implementation
//! arrives with the agent issue; this crate is an empty placeholder until
//! then.
#![forbid(unsafe_code)]
