//! The broker's settings: [`BrokerConfig`], who may hold which id
//! ([`Identities`], [`Vouchers`]) and who may publish and subscribe where
//! ([`Permissions`]).

use super::*;

/// Broker settings.
#[derive(Debug, Clone)]
pub struct BrokerConfig {
    /// Path of the listening socket. Its directory is created with mode
    /// 0700 if missing; the socket gets mode 0600.
    pub socket: PathBuf,
    /// Largest frame body accepted (default 1 MiB).
    pub max_frame: u32,
    /// Connections accepted at once; accepting resumes below 90%.
    pub max_connections: usize,
    /// Peer uids allowed besides the broker's own and root.
    pub allowed_uids: Vec<u32>,
    /// A subscriber's outbound queue limit, in bytes.
    pub queue_limit_bytes: usize,
    /// A subscriber's outbound queue limit, in messages.
    pub queue_limit_msgs: usize,
    /// A subscriber over its queue limit for longer than this is
    /// disconnected.
    pub slow_consumer_deadline: Duration,
    /// Topic permissions by client: the first entry whose `client` matches
    /// applies. Clients no entry matches get `default_permissions`, and
    /// with `None` there they are unrestricted (apart from the inbox
    /// rules, which always hold).
    pub permissions: Vec<ClientPermissions>,
    /// Permissions of clients no entry of `permissions` matches.
    pub default_permissions: Option<Permissions>,
    /// When set, only these client ids are welcomed until
    /// [`Broker::open`] is called; the others are refused with
    /// `ErrorCode::Limit`, which clients retry. A host uses it to have its
    /// own subscriptions in place before anyone can publish (a message
    /// published before its subscriber exists is gone).
    pub first_clients: Option<Vec<String>>,
    /// Who may hold which client id; `None`: any id, first come, first
    /// served (no host that can vouch for processes).
    pub identities: Option<Identities>,
    /// Subscribers (exact ids or `prefix*`) whose `Overflow::Block` is
    /// honoured; anyone else asking for `Block` gets `DropOldest` (and the
    /// slow-consumer deadline), so no such subscriber ever pauses a
    /// publisher. `None`: everyone may block.
    pub block_allowed: Option<Vec<String>>,
    /// Connections one uid may hold, besides proven ones.
    pub max_connections_per_uid: usize,
    /// Connections one process may hold, besides proven ones (where the OS
    /// reports the peer's pid).
    pub max_connections_per_pid: usize,
    /// A welcomed connection that is not proven and has neither
    /// subscribed nor published for this long is closed; `None`: never.
    pub idle_timeout: Option<Duration>,
    /// A frame begun and not completed for this long (the broker waiting
    /// for its bytes) closes its connection: a half-sent frame must not
    /// pin its buffer forever.
    pub frame_timeout: Duration,
    /// The largest frame body accepted from a connection that is not
    /// proven (only with `identities`).
    pub unproven_max_frame: u32,
    /// The bytes buffered by the broker for every connection together
    /// (read and write buffers); above it, connections that are not proven
    /// are not read and deliveries that could be dropped are. `None`: no
    /// limit besides the per-connection ones.
    pub memory_limit_bytes: Option<usize>,
}

/// Which client ids the broker welcomes only from processes it can prove
/// (see the module docs). Ids match exactly or by prefix when they end in
/// `*`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identities {
    /// The host's pid (the agent: its own `std::process::id()`): ids in
    /// `own` are accepted only from this process.
    pub host_pid: u32,
    /// Ids only the host process may hold (the agent's clients).
    pub own: Vec<String>,
    /// Ids only the process vouched for them may hold (configured
    /// collectors, enabled or not: an id nobody is vouched for is
    /// refused).
    pub vouched: Vec<String>,
}

/// The processes vouched for collector ids: shared between the broker and
/// its host's supervisor, which vouches for each process it starts or
/// adopts and revokes at its exit.
#[derive(Debug, Clone, Default)]
pub struct Vouchers {
    pub(super) table: Arc<Mutex<HashMap<String, Vouch>>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Vouch {
    pub(super) pid: u32,
    pub(super) start_time: Option<u64>,
}

impl Vouchers {
    /// From now on `client_id` is accepted from the process `pid` (as it
    /// is now: its start time is read here, so a process that later reuses
    /// the pid is not accepted), and from no other.
    pub fn vouch(&self, client_id: &str, pid: u32) {
        self.vouch_as(client_id, pid, daemoneye_platform::process_start_time(pid));
    }

    /// As [`Vouchers::vouch`], with the start time read by whoever started
    /// the process (a privileged supervisor in another process).
    pub fn vouch_as(&self, client_id: &str, pid: u32, start_time: Option<u64>) {
        if start_time.is_none() {
            log::warn!("bus: cannot read the start time of pid {pid} (vouched for {client_id})");
        }
        self.table.lock().insert(client_id.to_owned(), Vouch { pid, start_time });
    }

    /// `client_id` is no longer vouched for, if it was for `pid`.
    pub fn revoke(&self, client_id: &str, pid: u32) {
        let mut t = self.table.lock();
        if t.get(client_id).is_some_and(|v| v.pid == pid) {
            t.remove(client_id);
        }
    }

    /// Whether `pid` is, right now, the process vouched for `client_id`.
    pub(super) fn proves(&self, client_id: &str, pid: u32) -> bool {
        let Some(v) = self.table.lock().get(client_id).copied() else { return false };
        v.pid == pid && v.start_time.is_some() && daemoneye_platform::process_start_time(pid) == v.start_time
    }

    /// Whether `pid` is vouched for some id (it is then outside the caps).
    pub(super) fn vouched_pid(&self, pid: u32) -> bool {
        let found = self.table.lock().iter().find(|(_, v)| v.pid == pid).map(|(id, _)| id.clone());
        found.is_some_and(|id| self.proves(&id, pid))
    }
}

/// Whether `id` is `pattern` or starts with its prefix (`prefix*`).
pub(super) fn id_matches(pattern: &str, id: &str) -> bool {
    match pattern.strip_suffix('*') {
        Some(prefix) => id.starts_with(prefix),
        None => pattern == id,
    }
}

/// Connections proven processes may hold beyond `max_connections`.
pub(super) const PROVEN_ROOM: usize = 64;

/// With identities, room kept in every cap for a process that holds no
/// connection yet (a CLI): a process cannot take the last few itself.
pub(super) const FRESH_ROOM: usize = 4;

/// The longest asked-for id kept in an assigned one.
pub(super) const MAX_ASKED_ID: usize = 64;

/// What a client may publish and subscribe to: topic patterns, in which
/// `{client_id}` stands for the client's own id (so one entry can give
/// every collector its own heartbeat topic and nobody else's).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Permissions {
    /// A publish is allowed when one of these patterns matches its topic.
    /// Replies to inboxes (`direct.…`) are always allowed.
    pub publish: Vec<String>,
    /// A subscription is allowed when one of these patterns covers it
    /// (matches every topic it could match).
    pub subscribe: Vec<String>,
}

/// Permissions for the clients whose id is `client`, or starts with it when
/// it ends in `*` (`procmond-*`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientPermissions {
    /// An exact client id, or a prefix followed by `*`.
    pub client: String,
    /// What those clients may do.
    pub permissions: Permissions,
}

impl ClientPermissions {
    pub(super) fn applies_to(&self, client_id: &str) -> bool {
        id_matches(&self.client, client_id)
    }
}

impl Permissions {
    /// The patterns with `{client_id}` replaced.
    pub(super) fn resolve(&self, client_id: &str) -> Permissions {
        let sub = |v: &Vec<String>| v.iter().map(|p| p.replace("{client_id}", client_id)).collect();
        Permissions { publish: sub(&self.publish), subscribe: sub(&self.subscribe) }
    }

    pub(super) fn check(&self) -> Result<(), String> {
        for p in self.resolve("x").publish.iter().chain(self.resolve("x").subscribe.iter()) {
            topic::validate_pattern(p).map_err(|e| format!("permission pattern {p:?}: {e}"))?;
        }
        Ok(())
    }
}

impl BrokerConfig {
    /// Defaults for a socket path.
    pub fn new(socket: impl Into<PathBuf>) -> Self {
        BrokerConfig {
            socket: socket.into(),
            max_frame: frame::DEFAULT_MAX_FRAME,
            max_connections: 256,
            allowed_uids: Vec::new(),
            queue_limit_bytes: 8 << 20,
            queue_limit_msgs: 65_536,
            slow_consumer_deadline: Duration::from_secs(10),
            permissions: Vec::new(),
            default_permissions: None,
            first_clients: None,
            identities: None,
            block_allowed: None,
            max_connections_per_uid: usize::MAX,
            max_connections_per_pid: usize::MAX,
            idle_timeout: None,
            frame_timeout: Duration::from_secs(10),
            unproven_max_frame: frame::DEFAULT_MAX_FRAME,
            memory_limit_bytes: None,
        }
    }
}
