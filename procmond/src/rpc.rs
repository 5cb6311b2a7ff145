//! The RPC service (`procmond-rpc` thread): answers the agent's requests on
//! `control.collector.<collector_id>` one at a time — HealthCheck,
//! UpdateConfig, GracefulShutdown, BeginMonitoring — by messaging the
//! actor and replying with an [`RpcResponse`] status code. A malformed
//! request gets an `InvalidRequest` reply, never a crash; a full actor
//! inbox is `Busy`; a slow actor is `Timeout`; anything after a shutdown
//! began is `ShuttingDown`.
//!
//! GracefulShutdown is handed to the daemon's main thread (it owns every
//! component), which finishes the cycle, flushes, deregisters, and only
//! then sends this request's reply and exits 0.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use crossbeam_channel::{Receiver, Sender, bounded, select};
use daemoneye_bus::{Client, ClientError, Message};

use crate::actor::{ActorError, ActorSender};
use crate::shutdown::ShutdownRequest;
use daemoneye_contract::control::{self, RpcRequest, RpcResponse, RpcStatus};
use daemoneye_contract::{Version, topic};

/// How long the service waits for the actor.
pub const ACTOR_TIMEOUT: Duration = Duration::from_secs(3);

/// The RPC service thread's handle; dropping it stops and joins the thread.
pub struct RpcService {
    // Field order: the stop sender goes before the thread is joined.
    stop: Sender<()>,
    shutting_down: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl RpcService {
    /// Whether the thread has ended (a panic, before a shutdown): the
    /// main thread's watchdog asks.
    pub fn thread_ended(&self) -> bool {
        self.thread.as_ref().is_none_or(JoinHandle::is_finished)
    }

    /// Subscribes to this collector's RPC topic and starts the thread.
    /// Shutdown requests go to `shutdown`.
    pub fn start(
        client: Arc<Client>,
        collector_id: &str,
        actor: ActorSender,
        shutdown: Sender<ShutdownRequest>,
    ) -> Result<RpcService, ClientError> {
        let sub = client.subscribe(&control::rpc_topic(collector_id))?;
        let (stop, stop_rx) = bounded(1);
        let shutting_down = Arc::new(AtomicBool::new(false));
        let flag = shutting_down.clone();
        let thread = std::thread::Builder::new()
            .name("procmond-rpc".into())
            .spawn(move || {
                daemoneye_platform::threads::test_panic_point("procmond-rpc");
                let service = Service { client, actor, shutdown, shutting_down: flag };
                service.run(sub.messages(), stop_rx);
                drop(sub);
            })
            .map_err(|e| ClientError::Start(e.to_string()))?;
        Ok(RpcService { stop, shutting_down, thread: Some(thread) })
    }

    /// From now on every request is answered `ShuttingDown` (a signal began
    /// the shutdown).
    pub fn refuse_new_requests(&self) {
        self.shutting_down.store(true, Ordering::Release);
    }
}

impl Drop for RpcService {
    fn drop(&mut self) {
        let _ = self.stop.try_send(());
        if let Some(t) = self.thread.take()
            && t.join().is_err()
        {
            log::error!("procmond-rpc thread panicked");
        }
    }
}

struct Service {
    client: Arc<Client>,
    actor: ActorSender,
    shutdown: Sender<ShutdownRequest>,
    shutting_down: Arc<AtomicBool>,
}

impl Service {
    fn run(&self, requests: &Receiver<Message>, stop: Receiver<()>) {
        loop {
            select! {
                recv(requests) -> msg => match msg {
                    Ok(msg) => self.handle(msg),
                    Err(_) => break,
                },
                recv(stop) -> _ => break,
            }
        }
        log::debug!("procmond-rpc stopped");
    }

    fn handle(&self, msg: Message) {
        if msg.reply_to.is_none() {
            log::warn!("RPC on {} without a reply inbox: ignored", msg.topic);
            return;
        }
        // Only the agent may ask; the answer goes out in the version the
        // request came in (see `send`).
        let response = match topic::COLLECTOR_RPC.decode_request(&msg).map(|(q, _)| q) {
            Err(e) => {
                log::warn!("malformed RPC request on {} ({} bytes): {e}", msg.topic, msg.payload.len());
                RpcResponse::status(RpcStatus::InvalidRequest, format!("malformed request: {e}"))
            }
            Ok(_) if self.shutting_down.load(Ordering::Acquire) => {
                RpcResponse::status(RpcStatus::ShuttingDown, "collector is shutting down")
            }
            Ok(RpcRequest::HealthCheck) => match self.actor.health(ACTOR_TIMEOUT) {
                Ok(health) => RpcResponse { status: RpcStatus::Ok, message: None, health: Some(health) },
                Err(e) => error_response(e),
            },
            Ok(RpcRequest::UpdateConfig(update)) => match self.actor.update_config(update, ACTOR_TIMEOUT) {
                Ok(()) => RpcResponse::status(RpcStatus::Ok, "accepted; applies at the next cycle boundary"),
                Err(e) => error_response(e),
            },
            Ok(RpcRequest::BeginMonitoring) => match self.actor.begin_monitoring() {
                Ok(()) => RpcResponse::ok(),
                Err(e) => error_response(e),
            },
            Ok(RpcRequest::GracefulShutdown) => {
                self.shutting_down.store(true, Ordering::Release);
                let request = ShutdownRequest { reason: "GracefulShutdown RPC".into(), rpc: Some(msg) };
                match self.shutdown.try_send(request) {
                    // The main thread replies once everything is flushed.
                    Ok(()) => return,
                    Err(e) => {
                        log::warn!("shutdown already under way");
                        let msg = e.into_inner().rpc;
                        let response =
                            RpcResponse::status(RpcStatus::ShuttingDown, "shutdown already under way");
                        if let Some(msg) = msg {
                            self.send(&msg, &response);
                        }
                        return;
                    }
                }
            }
        };
        self.send(&msg, &response);
    }

    fn send(&self, msg: &Message, response: &RpcResponse) {
        let bytes = topic::COLLECTOR_RPC.encode_answer(Version::of(&msg.payload), response);
        if let Err(e) = self.client.reply(msg, &bytes) {
            log::warn!("RPC reply on {:?} failed: {e}", msg.reply_to);
        }
    }
}

/// The reply for an actor that did not answer.
pub fn error_response(e: ActorError) -> RpcResponse {
    let status = match &e {
        ActorError::Busy => RpcStatus::Busy,
        ActorError::Timeout(_) => RpcStatus::Timeout,
        ActorError::ShuttingDown => RpcStatus::ShuttingDown,
        ActorError::Refused(_) => RpcStatus::InvalidRequest,
    };
    RpcResponse::status(status, e.to_string())
}
