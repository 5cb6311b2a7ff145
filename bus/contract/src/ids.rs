//! Client ids on the bus that more than one crate must agree on: the
//! agent's own clients (whose publishes others check against the
//! broker-vouched `from`) and the collector type procmond registers as.

/// The agent's client id on the bus (monitor, status, RPCs).
pub const AGENT_CLIENT_ID: &str = "daemoneye-agent";

/// The store writer's own client id: its connection stalls when a commit
/// fails (the broker holds the collectors back through it), and must not
/// take the agent's control traffic (heartbeats, registrations, RPC
/// replies, status) down with it. A `StoreAck` is the store's word only
/// when it comes from this id.
pub const STORE_CLIENT_ID: &str = "daemoneye-agent-store";

/// The task coordinator's own client id: a task waits seconds for
/// collectors, which must hold up neither control traffic nor the store.
pub const TASKS_CLIENT_ID: &str = "daemoneye-agent-tasks";

/// The prefix of the CLI's client ids (`cli-<pid>`).
pub const CLI_CLIENT_PREFIX: &str = "cli-";

/// The collector type procmond registers as (and the task topic it
/// serves).
pub const COLLECTOR_TYPE: &str = "process-monitor";

/// A collector id is one bus topic segment: 1 to 64 of `a-z`, `0-9`, `-`,
/// `_`. The error says why not, for the caller's configuration error.
pub fn validate_collector_id(id: &str) -> Result<(), String> {
    let ok = !id.is_empty()
        && id.len() <= 64
        && id.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_');
    if ok { Ok(()) } else { Err(format!("{id:?}: use 1-64 of a-z, 0-9, '-', '_'")) }
}
