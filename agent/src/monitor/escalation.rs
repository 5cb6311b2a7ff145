//! Heartbeat deadlines, the loading deadline and the escalations they
//! start (see the parent module's docs): the monitor's periodic check, and
//! the `agent-escalate-<id>` threads it starts.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crossbeam_channel::Sender;
use daemoneye_contract::control::{CollectorState, LifecycleCommand, RpcRequest, RpcResponse, RpcStatus};
use daemoneye_contract::{Version, topic};

use super::{ACK_STALL_RULE, Entry, State, StepReport, WAITING_LOG};
use crate::api::{AgentState, CollectorPhase};
use crate::config::EscalationSpec;

/// Why an escalation started.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Failure {
    /// Heartbeats missed.
    Heartbeats,
    /// Events unacknowledged past `delivery.ack_stall_secs`: an answer to
    /// the health check ends it (the collector lives; the store or the bus
    /// is where delivery stalls, and restarting the collector would not
    /// help).
    AckStall,
    /// The collector said `Unhealthy` in consecutive heartbeats: an answer
    /// does not end it; the collector is restarted.
    Unhealthy,
}

/// Heartbeats missed before a collector counts as failed.
const MISSES_TO_FAIL: u32 = 3;
/// Steps kept per collector.
pub(super) const STEPS_KEPT: usize = 12;

/// Whether a collector's delivery is a failure now: its acknowledgements
/// stalled (events are unacknowledged, the oldest of them, aged since the
/// heartbeat that stated it, is older than `stall`, and its base has not
/// moved for `stall` by the agent's clock) or it said `Unhealthy` in
/// [`MISSES_TO_FAIL`] heartbeats in a row. A stall is raised once and
/// cleared when acknowledgements move again (the base moves, or nothing
/// is left unacknowledged).
fn delivery_failure(e: &mut Entry, now: Instant, stall: Duration) -> Option<Failure> {
    if e.unhealthy >= MISSES_TO_FAIL {
        log::error!("collector {}: unhealthy in {} heartbeats; failed, escalating", e.spec.id, e.unhealthy);
        e.unhealthy = 0;
        return Some(Failure::Unhealthy);
    }
    let d = e.delivery.as_ref()?;
    let (base, since) = e.base_since?;
    if e.stalled {
        if d.unacknowledged == 0 || base != e.stalled_base {
            log::info!("collector {}: acknowledgements move again", e.spec.id);
            e.stalled = false;
        }
        return None;
    }
    let age = Duration::from_millis(d.oldest_unacknowledged_ms) + now.saturating_duration_since(e.last_seen);
    if d.unacknowledged == 0 || age < stall || now.saturating_duration_since(since) < stall {
        return None;
    }
    e.stalled_base = base;
    e.stalled = true;
    log::error!(
        "collector {}: {} events unacknowledged, the oldest for {:?} (delivery.ack_stall_secs is {}); \
         failed, escalating",
        e.spec.id,
        d.unacknowledged,
        age,
        stall.as_secs()
    );
    Some(Failure::AckStall)
}

impl State {
    pub(super) fn escalation_step(&mut self, r: StepReport) {
        if let Some(e) = self.entry(&r.id) {
            e.step(r.step, r.outcome);
            if r.done {
                // It answered: count misses afresh from now.
                e.escalating = false;
                e.missed = 0;
                e.last_seen = Instant::now();
                e.phase = CollectorPhase::Degraded;
            }
        }
    }

    /// Loading progress, heartbeat deadlines and delivery stalls;
    /// `Some(reason)` when startup failed.
    pub(super) fn check(&mut self, steps: &Sender<StepReport>) -> Option<String> {
        let now = Instant::now();
        if self.state == AgentState::Loading {
            // A cold start waits for every collector to register, so they
            // all begin together; a warm one (collectors were adopted:
            // they monitored before this agent started) holds nobody back:
            // a collector that never registers is then stopped after its
            // startup timeout like any restarted one, not the whole start.
            let waiting: Vec<String> = self
                .entries
                .iter()
                .filter(|e| !self.warm && e.spec.enabled && !e.registered)
                .map(|e| match e.pid {
                    Some(pid) => format!("{} (pid {pid})", e.spec.id),
                    None => format!("{} (not started)", e.spec.id),
                })
                .collect();
            if !waiting.is_empty() && now.duration_since(self.waiting_logged) >= WAITING_LOG {
                self.waiting_logged = now;
                log::warn!(
                    "Loading for {} s: waiting for {} to register (the start fails at its startup_timeout_secs)",
                    now.duration_since(self.started).as_secs(),
                    waiting.join(", ")
                );
            }
            if waiting.is_empty() {
                if self.warm {
                    log::info!(
                        "warm start (collectors adopted): monitoring begins without waiting for registrations"
                    );
                }
                self.set_state(AgentState::Ready);
                // Every registered collector reads the oldest version
                // among them.
                let version = self.collector_version();
                let cmd = topic::LIFECYCLE.encode_as(version, &LifecycleCommand::BeginMonitoring);
                if let Err(e) = self.parts.client.publish_confirmed(topic::LIFECYCLE.pattern(), &cmd) {
                    // The collectors are registered, so the broker is up;
                    // the next tick tries again.
                    log::warn!("cannot broadcast BeginMonitoring: {e}");
                    self.state = AgentState::Loading;
                    return None;
                }
                log::info!("BeginMonitoring sent to {} collector(s)", self.enabled());
                for e in &mut self.entries {
                    if e.registered {
                        e.phase = CollectorPhase::Running;
                    }
                }
                self.set_state(AgentState::SteadyState);
            } else if let late @ [_, ..] = &self
                .entries
                .iter()
                .filter(|e| {
                    e.spec.enabled
                        && !e.registered
                        && now >= self.started + Duration::from_secs(e.spec.startup_timeout_secs)
                })
                .map(|e| {
                    // Why, when it exited on the way: its status and last words.
                    let exit =
                        e.last_exit.as_deref().map(|x| format!("; last exit: {x}")).unwrap_or_default();
                    format!("{} ({} s{exit})", e.spec.id, e.spec.startup_timeout_secs)
                })
                .collect::<Vec<_>>()[..]
            {
                let reason =
                    format!("collector(s) {} did not register within their startup timeout", late.join(", "));
                self.set_state(AgentState::StartupFailed { reason: reason.clone() });
                return Some(reason);
            }
            return None;
        }
        if self.state != AgentState::SteadyState {
            return None;
        }
        let kill_wait = Duration::from_secs(self.parts.config.escalation.kill_timeout_secs);
        let stall = Duration::from_secs(self.parts.config.delivery.ack_stall_secs);
        for i in 0..self.entries.len() {
            let e = &mut self.entries[i];
            // A (re)started collector that never registers is stopped and
            // started again by the restart policy.
            if !e.registered
                && !e.escalating
                && e.phase == CollectorPhase::Starting
                && let Some(pid) = e.pid
                && now.duration_since(e.last_seen) >= Duration::from_secs(e.spec.startup_timeout_secs)
            {
                log::error!(
                    "collector {}: pid {pid} did not register within {} s; stopping it",
                    e.spec.id,
                    e.spec.startup_timeout_secs
                );
                e.escalating = true;
                e.escalation.clear();
                e.step("register_timeout", format!("pid {pid} did not register; SIGKILL"));
                self.parts.supervisor.stop(&e.spec.id, pid, Duration::ZERO, kill_wait);
                continue;
            }
            if !e.registered || e.escalating {
                continue;
            }
            if let Some(failure) = delivery_failure(e, now, stall) {
                e.phase = CollectorPhase::Failed;
                e.escalating = true;
                e.escalation.clear();
                e.cancel = Arc::new(AtomicBool::new(false));
                let (id, cancel) = (e.spec.id.clone(), e.cancel.clone());
                if failure == Failure::AckStall {
                    let text = format!("collector {id}: events unacknowledged for more than {stall:?}");
                    self.parts.writer.system_alert(&id, ACK_STALL_RULE, &text);
                }
                match e.pid {
                    Some(pid) => self.escalate(id, pid, cancel, steps.clone(), failure),
                    None => log::error!("collector {id}: no pid to escalate"),
                }
                continue;
            }
            // Late after the interval plus 10% grace, per heartbeat.
            let late = e.interval + e.interval / 10;
            let missed = u32::try_from(now.duration_since(e.last_seen).as_millis() / late.as_millis().max(1))
                .unwrap_or(u32::MAX);
            if missed <= e.missed {
                continue;
            }
            e.missed = missed;
            if missed < MISSES_TO_FAIL {
                log::warn!("collector {}: {missed} heartbeat(s) missed; degraded", e.spec.id);
                e.phase = CollectorPhase::Degraded;
            } else {
                log::error!("collector {}: {missed} heartbeats missed; failed, escalating", e.spec.id);
                e.phase = CollectorPhase::Failed;
                e.escalating = true;
                e.escalation.clear();
                e.cancel = Arc::new(AtomicBool::new(false));
                let (id, cancel) = (e.spec.id.clone(), e.cancel.clone());
                match e.pid {
                    Some(pid) => self.escalate(id, pid, cancel, steps.clone(), Failure::Heartbeats),
                    None => log::error!("collector {id}: no pid to escalate"),
                }
            }
        }
        None
    }

    /// Starts an escalation thread for a failed collector.
    fn escalate(
        &mut self,
        id: String,
        pid: u32,
        cancel: Arc<AtomicBool>,
        steps: Sender<StepReport>,
        failure: Failure,
    ) {
        let client = self.parts.client.clone();
        let supervisor = self.parts.supervisor.clone();
        let esc: EscalationSpec = self.parts.config.escalation.clone();
        let version = self.entries.iter().find(|e| e.spec.id == id).map_or(Version::CURRENT, |e| e.version);
        let spawned = std::thread::Builder::new().name(format!("agent-escalate-{id}")).spawn(move || {
            let report = |step: &'static str, outcome: String, done: bool| {
                let _ = steps.send(StepReport { id: id.clone(), step, outcome, done });
            };
            let rpc = |req: &RpcRequest, secs: u64| -> Result<RpcResponse, String> {
                let rpc = topic::COLLECTOR_RPC;
                let reply = client
                    .request(&rpc.at(&id), &rpc.request.encode_as(version, req), Duration::from_secs(secs))
                    .map_err(|e| e.to_string())?;
                rpc.decode_answer(&reply).map(|(a, _)| a).map_err(|e| format!("undecodable reply: {e}"))
            };
            match failure {
                Failure::Heartbeats => {}
                Failure::AckStall => report(
                    "ack_stall",
                    "events unacknowledged past delivery.ack_stall_secs; health check".into(),
                    false,
                ),
                Failure::Unhealthy => {
                    report("unhealthy", "the collector says it is unhealthy; health check".into(), false)
                }
            }
            match rpc(&RpcRequest::HealthCheck, esc.health_check_timeout_secs) {
                Ok(r) if r.status == RpcStatus::Ok && failure == Failure::Unhealthy => report(
                    "health_check",
                    format!("answered, unhealthy ({:?}); restarting it", r.health.map(|h| h.state)),
                    false,
                ),
                Ok(r) if r.status == RpcStatus::Ok && failure == Failure::AckStall => {
                    let unacked = r.health.map_or(0, |h| h.unacknowledged_events);
                    return report(
                        "health_check",
                        format!(
                            "answered ({unacked} events unacknowledged): the collector lives, so delivery \
                             stalls at the store or on the bus; escalation ends (see the store's status)"
                        ),
                        true,
                    );
                }
                Ok(r) if r.status == RpcStatus::Ok => {
                    let state = r.health.map(|h| h.state);
                    // Alive but not collecting: it missed BeginMonitoring.
                    if state == Some(CollectorState::WaitingForAgent) {
                        let begun = rpc(&RpcRequest::BeginMonitoring, esc.health_check_timeout_secs);
                        let outcome = match begun {
                            Ok(r) => format!(
                                "answered, waiting for the agent; BeginMonitoring sent: {:?}",
                                r.status
                            ),
                            Err(e) => format!("answered, waiting for the agent; BeginMonitoring failed: {e}"),
                        };
                        return report("health_check", outcome, true);
                    }
                    let state = state.map(|s| format!("{s:?}")).unwrap_or_default();
                    return report("health_check", format!("answered ({state}); escalation ends"), true);
                }
                Ok(r) => report(
                    "health_check",
                    format!("answered {:?}: {}", r.status, r.message.unwrap_or_default()),
                    false,
                ),
                Err(e) => report("health_check", format!("no answer: {e}"), false),
            }
            if cancel.load(Ordering::Acquire) {
                return;
            }
            match rpc(&RpcRequest::GracefulShutdown, esc.graceful_shutdown_timeout_secs) {
                Ok(r) => report("graceful_shutdown", format!("answered {:?}", r.status), false),
                Err(e) => report("graceful_shutdown", format!("no answer: {e}"), false),
            }
            if cancel.load(Ordering::Acquire) {
                return;
            }
            // The supervisor waits for the exit, then SIGKILLs (that
            // process only); the exit is restarted by its policy and
            // reported there.
            supervisor.stop(
                &id,
                pid,
                Duration::from_secs(esc.graceful_shutdown_timeout_secs),
                Duration::from_secs(esc.kill_timeout_secs),
            );
            report("stop", "waiting for the exit, then SIGKILL".into(), false);
        });
        match spawned {
            Ok(t) => self.escalations.push(t),
            Err(e) => log::error!("cannot start an escalation thread: {e}"),
        }
        self.escalations.retain(|t| !t.is_finished());
    }

    pub(super) fn join_escalations(&mut self) {
        for t in self.escalations.drain(..) {
            let _ = t.join();
        }
    }
}
