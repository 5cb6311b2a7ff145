//! Typed topics: each bus topic bound to its payload type and to the role
//! that may publish on it.
//!
//! A [`Topic<T>`] encodes only a `T` and decodes only a `T`, so the wrong
//! payload on a topic does not compile. Its decoder also checks the
//! publisher: the `from` of a delivery is the client id the broker knows
//! the sender by, and a payload from a client that does not hold the
//! topic's [`Role`] is refused ([`Error::WrongPublisher`]) before it is
//! decoded. A topic with a `+` segment (one collector's heartbeats, one
//! collector type's tasks) gives the concrete topic with [`Topic::at`].
//! [`Rpc<Q, A>`] does the same for request/reply: the request's type and
//! role, the answer's type and role.
//!
//! | topic | payload | publisher |
//! |---|---|---|
//! | `events.process.<kind>` ([`EVENTS`]) | `EventEnvelope` | collector |
//! | `events.process.gap` ([`GAPS`]) | `StreamGap` | collector |
//! | `control.ack.<collector>` ([`ACKS`]) | `StoreAck` | store |
//! | `control.health.heartbeat.<collector>` ([`HEARTBEATS`]) | `Heartbeat` | collector |
//! | `control.collector.lifecycle` ([`LIFECYCLE`]) | `LifecycleCommand` | agent |
//! | `control.collector.registration` ([`REGISTRATION`]) | `RegistrationMessage` → `RegistrationResponse` | collector → agent |
//! | `control.collector.<collector>` ([`COLLECTOR_RPC`]) | `RpcRequest` → `RpcResponse` | agent → collector |
//! | `control.collector.task.<type>` ([`TASKS`]) | `TaskRequest` → `TaskResponse` | tasks → collector |
//! | `control.collector.task.<type>.all` ([`TASKS_ALL`]) | `TaskRequest` → `TaskResponse` | tasks → collector |
//! | `events.alert` ([`ALERTS`]) | `Alert` | store |
//! | `agent.status` ([`STATUS`]) | `StatusRequest` → `AgentStatus` | anyone → agent |
//! | `agent.task` ([`AGENT_TASKS`]) | `AgentTaskRequest` → `AgentTaskResponse` | anyone → tasks |
//!
//! A topic with a collector's id in it says whose it is; that the payload
//! speaks for the same collector (`collector_id == from`) is the
//! receiver's check, which knows the field.

use std::marker::PhantomData;

use crate::api::{AgentStatus, AgentTaskRequest, AgentTaskResponse, Alert, StatusRequest};
use crate::codec::{self, Error, Message, Version};
use crate::control::{
    Heartbeat, LifecycleCommand, RegistrationMessage, RegistrationResponse, RpcRequest, RpcResponse,
    StoreAck, TaskRequest, TaskResponse,
};
use crate::event::{EventEnvelope, StreamGap};
use crate::ids::{AGENT_CLIENT_ID, CLI_CLIENT_PREFIX, STORE_CLIENT_ID, TASKS_CLIENT_ID};

/// Who may publish on a topic, by the client id the broker vouches for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    /// The agent's control client ([`AGENT_CLIENT_ID`]).
    Agent,
    /// The agent's store writer ([`STORE_CLIENT_ID`]).
    Store,
    /// The agent's task coordinator ([`TASKS_CLIENT_ID`]).
    Tasks,
    /// A collector: any client id that is none of the agent's, not the
    /// CLI's, not the broker's own and not one it assigned (`bus-<n>-…`,
    /// given to clients that cannot prove the id they asked for).
    Collector,
    /// The command-line tool (`cli-<pid>`).
    Cli,
    /// Any client the broker admits.
    Anyone,
}

impl Role {
    /// Whether the client `from` (a broker-vouched id) holds this role.
    pub fn admits(self, from: &str) -> bool {
        let agents = [AGENT_CLIENT_ID, STORE_CLIENT_ID, TASKS_CLIENT_ID];
        match self {
            Role::Agent => from == AGENT_CLIENT_ID,
            Role::Store => from == STORE_CLIENT_ID,
            Role::Tasks => from == TASKS_CLIENT_ID,
            Role::Collector => {
                !agents.contains(&from)
                    && !from.starts_with(CLI_CLIENT_PREFIX)
                    && from != "bus"
                    && !from.starts_with("bus-")
                    && !from.is_empty()
            }
            Role::Cli => from.starts_with(CLI_CLIENT_PREFIX),
            Role::Anyone => true,
        }
    }
}

/// A topic (or pattern with one `+`), its payload type and its publisher.
#[derive(Debug)]
pub struct Topic<T> {
    pattern: &'static str,
    publisher: Role,
    payload: PhantomData<fn() -> T>,
}

impl<T> Clone for Topic<T> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<T> Copy for Topic<T> {}

impl<T: Message> Topic<T> {
    /// Binds `pattern` to `T` and `publisher`.
    pub const fn new(pattern: &'static str, publisher: Role) -> Topic<T> {
        Topic { pattern, publisher, payload: PhantomData }
    }

    /// The pattern to subscribe to (the topic itself when it has no `+`).
    pub const fn pattern(&self) -> &'static str {
        self.pattern
    }

    /// Who may publish on it.
    pub fn publisher(&self) -> Role {
        self.publisher
    }

    /// The concrete topic with `segment` in place of the `+`.
    pub fn at(&self, segment: &str) -> String {
        self.pattern.replacen('+', segment, 1)
    }

    /// Encodes a payload for this topic in the current version.
    pub fn encode(&self, value: &T) -> Vec<u8> {
        codec::encode(value)
    }

    /// Encodes a payload for this topic in `version` (an older peer's).
    pub fn encode_as(&self, version: Version, value: &T) -> Vec<u8> {
        codec::encode_as(version, value)
    }

    /// Checks the publisher of a delivery, then decodes its payload.
    pub fn decode(&self, msg: &daemoneye_bus::Message) -> Result<T, Error> {
        self.decode_versioned(msg).map(|(v, _)| v)
    }

    /// [`Topic::decode`], saying which version the publisher spoke.
    pub fn decode_versioned(&self, msg: &daemoneye_bus::Message) -> Result<(T, Version), Error> {
        check_publisher(self.pattern, self.publisher, msg)?;
        codec::decode_versioned(&msg.payload)
    }
}

/// A request/reply topic: the request's type and who may ask, the
/// answer's type and who answers.
#[derive(Debug)]
pub struct Rpc<Q, A> {
    /// The request side.
    pub request: Topic<Q>,
    /// Who may answer (checked on the reply's `from`).
    pub responder: Role,
    answer: PhantomData<fn() -> A>,
}

impl<Q, A> Clone for Rpc<Q, A> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<Q, A> Copy for Rpc<Q, A> {}

impl<Q: Message, A: Message> Rpc<Q, A> {
    /// Binds a request pattern, its requester and its responder.
    pub const fn new(pattern: &'static str, requester: Role, responder: Role) -> Rpc<Q, A> {
        Rpc { request: Topic::new(pattern, requester), responder, answer: PhantomData }
    }

    /// The pattern to subscribe to.
    pub const fn pattern(&self) -> &'static str {
        self.request.pattern
    }

    /// The concrete topic with `segment` in place of the `+`.
    pub fn at(&self, segment: &str) -> String {
        self.request.at(segment)
    }

    /// Encodes a request.
    pub fn encode_request(&self, value: &Q) -> Vec<u8> {
        codec::encode(value)
    }

    /// Checks the requester, then decodes a request.
    pub fn decode_request(&self, msg: &daemoneye_bus::Message) -> Result<(Q, Version), Error> {
        self.request.decode_versioned(msg)
    }

    /// Encodes an answer in `version`: the version the request came in, so
    /// an older peer reads its answer.
    pub fn encode_answer(&self, version: Version, value: &A) -> Vec<u8> {
        codec::encode_as(version, value)
    }

    /// Checks the responder, then decodes an answer.
    pub fn decode_answer(&self, msg: &daemoneye_bus::Message) -> Result<(A, Version), Error> {
        check_publisher(self.request.pattern, self.responder, msg)?;
        codec::decode_versioned(&msg.payload)
    }
}

/// Sending through the bus's client, whose transport (Unix sockets) exists
/// on Unix only; encoding and decoding are everywhere.
#[cfg(unix)]
mod transport {
    use daemoneye_bus::{Client, ClientError};

    use super::{Error, Message, Rpc, Topic};

    impl<T: Message> Topic<T> {
        /// Publishes `value` on `topic` (this topic, or one of [`Topic::at`]'s).
        pub fn publish(&self, client: &Client, topic: &str, value: &T) -> Result<(), ClientError> {
            client.publish(topic, &self.encode(value))
        }
    }

    impl<Q: Message, A: Message> Rpc<Q, A> {
        /// Sends a request on `topic` and decodes the answer.
        pub fn call(
            &self,
            client: &Client,
            topic: &str,
            value: &Q,
            timeout: std::time::Duration,
        ) -> Result<Result<A, Error>, ClientError> {
            let reply = client.request(topic, &self.encode_request(value), timeout)?;
            Ok(self.decode_answer(&reply).map(|(a, _)| a))
        }
    }
}

fn check_publisher(pattern: &'static str, role: Role, msg: &daemoneye_bus::Message) -> Result<(), Error> {
    if role.admits(&msg.from) {
        Ok(())
    } else {
        Err(Error::WrongPublisher { topic: pattern, from: msg.from.clone(), role })
    }
}

/// Process events, one topic per kind (`events.process.started`, …).
pub const EVENTS: Topic<EventEnvelope> = Topic::new("events.process.+", Role::Collector);
/// Gap markers: events of a stream that will never come.
pub const GAPS: Topic<StreamGap> = Topic::new("events.process.gap", Role::Collector);
/// The store's acknowledgements to one collector.
pub const ACKS: Topic<StoreAck> = Topic::new("control.ack.+", Role::Store);
/// One collector's heartbeats.
pub const HEARTBEATS: Topic<Heartbeat> = Topic::new("control.health.heartbeat.+", Role::Collector);
/// Lifecycle commands broadcast by the agent.
pub const LIFECYCLE: Topic<LifecycleCommand> = Topic::new("control.collector.lifecycle", Role::Agent);
/// Registration and deregistration.
pub const REGISTRATION: Rpc<RegistrationMessage, RegistrationResponse> =
    Rpc::new("control.collector.registration", Role::Collector, Role::Agent);
/// The agent's RPCs to one collector.
pub const COLLECTOR_RPC: Rpc<RpcRequest, RpcResponse> =
    Rpc::new("control.collector.+", Role::Agent, Role::Collector);
/// Tasks for one collector of a type (queue group).
pub const TASKS: Rpc<TaskRequest, TaskResponse> =
    Rpc::new("control.collector.task.+", Role::Tasks, Role::Collector);
/// Tasks for every collector of a type.
pub const TASKS_ALL: Rpc<TaskRequest, TaskResponse> =
    Rpc::new("control.collector.task.+.all", Role::Tasks, Role::Collector);
/// Alerts raised by the store's rules.
pub const ALERTS: Topic<Alert> = Topic::new("events.alert", Role::Store);
/// The agent's status.
pub const STATUS: Rpc<StatusRequest, AgentStatus> = Rpc::new("agent.status", Role::Anyone, Role::Agent);
/// Tasks asked of the agent (`daemoneye-cli ps`, `inspect`, `hash`).
pub const AGENT_TASKS: Rpc<AgentTaskRequest, AgentTaskResponse> =
    Rpc::new("agent.task", Role::Anyone, Role::Tasks);

#[cfg(test)]
mod tests {
    use super::*;

    fn delivery(topic: &str, from: &str, payload: Vec<u8>) -> daemoneye_bus::Message {
        daemoneye_bus::Message { topic: topic.into(), payload, reply_to: None, from: from.into() }
    }

    #[test]
    fn roles_admit_by_the_vouched_client_id() {
        assert!(Role::Store.admits(STORE_CLIENT_ID));
        assert!(!Role::Store.admits("procmond"));
        assert!(Role::Collector.admits("procmond"));
        for id in [AGENT_CLIENT_ID, STORE_CLIENT_ID, TASKS_CLIENT_ID, "cli-42", "bus", ""] {
            assert!(!Role::Collector.admits(id), "{id}");
        }
        assert!(Role::Cli.admits("cli-42") && Role::Anyone.admits("x"));
        assert!(!Role::Collector.admits("bus-7-procmond"), "an id the broker assigned is nobody's");
    }

    #[test]
    fn a_payload_from_the_wrong_role_is_refused_before_decoding() {
        let ack = StoreAck { stream_id: 1, through: 5 };
        let topic = ACKS.at("procmond");
        assert_eq!(topic, "control.ack.procmond");
        let good = delivery(&topic, STORE_CLIENT_ID, ACKS.encode(&ack));
        assert_eq!(ACKS.decode(&good).unwrap(), ack);
        let forged = delivery(&topic, "procmond", ACKS.encode(&ack));
        match ACKS.decode(&forged) {
            Err(Error::WrongPublisher { from, role: Role::Store, .. }) => assert_eq!(from, "procmond"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn every_topic_is_valid_on_the_bus() {
        for p in [EVENTS.pattern(), GAPS.pattern(), ACKS.pattern(), HEARTBEATS.pattern(), LIFECYCLE.pattern()]
        {
            assert!(daemoneye_bus::validate_pattern(p).is_ok(), "{p}");
        }
        for p in [REGISTRATION.pattern(), COLLECTOR_RPC.pattern(), TASKS.pattern(), TASKS_ALL.pattern()] {
            assert!(daemoneye_bus::validate_pattern(p).is_ok(), "{p}");
        }
        assert_eq!(TASKS_ALL.at("process-monitor"), "control.collector.task.process-monitor.all");
        assert!(daemoneye_bus::validate_topic(&HEARTBEATS.at("procmond")).is_ok());
    }
}
