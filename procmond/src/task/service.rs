//! The task service thread (`procmond-tasks`, see [`crate::task`]): the
//! bus's side of tasks, built where the bus is (Unix).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender, bounded, select};
use daemoneye_bus::{Client, ClientError, Message, Strategy};
use daemoneye_contract::control::{self, TASK_GROUP, TaskRequest, TaskResponse, TaskStatus};
use daemoneye_contract::{Version, codec};

use super::{TASK_ACTOR_TIMEOUT, TaskCounters};
use crate::actor::{ActorError, ActorSender};

/// Settings of the task service.
#[derive(Debug, Clone)]
pub struct TaskServiceConfig {
    /// This collector's id (named in every answer).
    pub collector_id: String,
    /// The collector type whose task topic it serves.
    pub collector_type: String,
    /// How the broker picks a member of the group when a task does not
    /// say (the agent's do: it chooses per task type). The group takes the
    /// strategy of its first member (a broker rule).
    pub strategy: Strategy,
    /// How long to wait for the actor.
    pub actor_timeout: Duration,
}

impl TaskServiceConfig {
    /// procmond's type, round robin, [`TASK_ACTOR_TIMEOUT`].
    pub fn new(collector_id: &str) -> TaskServiceConfig {
        TaskServiceConfig {
            collector_id: collector_id.to_owned(),
            collector_type: crate::registration::COLLECTOR_TYPE.to_owned(),
            strategy: Strategy::RoundRobin,
            actor_timeout: TASK_ACTOR_TIMEOUT,
        }
    }
}

/// The task service thread's handle; dropping it leaves the group, answers
/// the tasks already delivered "shutting down", and joins the thread.
pub struct TaskService {
    // Field order: the stop sender goes before the thread is joined.
    stop: Sender<()>,
    shutting_down: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl TaskService {
    /// Whether the thread has ended (a panic, before a shutdown): the
    /// main thread's watchdog asks.
    pub fn thread_ended(&self) -> bool {
        self.thread.as_ref().is_none_or(JoinHandle::is_finished)
    }

    /// Joins the task group of `cfg.collector_type` and starts the thread.
    pub fn start(
        client: Arc<Client>,
        cfg: TaskServiceConfig,
        actor: ActorSender,
        counters: Arc<TaskCounters>,
    ) -> Result<TaskService, ClientError> {
        let topic = control::task_topic(&cfg.collector_type);
        let sub = client.queue_subscribe(&topic, TASK_GROUP, cfg.strategy)?;
        let all = client.subscribe(&control::task_broadcast_topic(&cfg.collector_type))?;
        let (stop, stop_rx) = bounded(1);
        let shutting_down = Arc::new(AtomicBool::new(false));
        let flag = shutting_down.clone();
        let thread = std::thread::Builder::new()
            .name("procmond-tasks".into())
            .spawn(move || {
                daemoneye_platform::threads::test_panic_point("procmond-tasks");
                let service = Service { client, cfg, actor, counters, shutting_down: flag };
                service.run(sub.messages(), all.messages(), &stop_rx);
                // Leave the group first, so new tasks go to other members,
                // then answer what was delivered already.
                let delivered = [sub.messages().clone(), all.messages().clone()];
                drop(sub);
                drop(all);
                service.shutting_down.store(true, Ordering::Release);
                for msg in delivered.iter().flat_map(|d| d.try_iter()) {
                    service.handle(msg);
                }
                log::debug!("procmond-tasks stopped");
            })
            .map_err(|e| ClientError::Start(e.to_string()))?;
        Ok(TaskService { stop, shutting_down, thread: Some(thread) })
    }

    /// From now on every task is answered `Failed` ("shutting down").
    pub fn refuse_new_requests(&self) {
        self.shutting_down.store(true, Ordering::Release);
    }
}

impl Drop for TaskService {
    fn drop(&mut self) {
        self.shutting_down.store(true, Ordering::Release);
        let _ = self.stop.try_send(());
        if let Some(t) = self.thread.take()
            && t.join().is_err()
        {
            log::error!("procmond-tasks thread panicked");
        }
    }
}

struct Service {
    client: Arc<Client>,
    cfg: TaskServiceConfig,
    actor: ActorSender,
    counters: Arc<TaskCounters>,
    shutting_down: Arc<AtomicBool>,
}

impl Service {
    fn run(&self, tasks: &Receiver<Message>, all: &Receiver<Message>, stop: &Receiver<()>) {
        loop {
            select! {
                recv(tasks) -> msg => match msg {
                    Ok(msg) => self.handle(msg),
                    Err(_) => break,
                },
                recv(all) -> msg => match msg {
                    Ok(msg) => self.handle(msg),
                    Err(_) => break,
                },
                recv(stop) -> _ => break,
            }
        }
    }

    fn handle(&self, msg: Message) {
        let arrived = Instant::now();
        let id = self.cfg.collector_id.as_str();
        if msg.reply_to.is_none() {
            log::warn!("task on {} from {} without a reply inbox: ignored", msg.topic, msg.from);
            self.counters.unanswerable();
            return;
        }
        let response = match control::decode::<TaskRequest>(&msg.payload) {
            Err(e) => {
                log::warn!(
                    "malformed task on {} from {} ({} bytes): {e}",
                    msg.topic,
                    msg.from,
                    msg.payload.len()
                );
                TaskResponse::failed(id, format!("malformed task: {e}"))
            }
            Ok(_) if self.shutting_down.load(Ordering::Acquire) => {
                TaskResponse::unavailable(id, "collector is shutting down")
            }
            Ok(request) => match self.actor.task(request, self.cfg.actor_timeout) {
                Ok(response) => response,
                Err(ActorError::Busy) => {
                    TaskResponse::unavailable(id, "busy: the collector's inbox is full; try another member")
                }
                Err(e) => TaskResponse::unavailable(id, e.to_string()),
            },
        };
        let status = self.send(&msg, response);
        self.counters.answered(status, arrived.elapsed());
    }

    /// Replies; a result the bus cannot carry is replaced by a `Failed`
    /// answer that says so. Returns the status sent.
    fn send(&self, msg: &Message, response: TaskResponse) -> TaskStatus {
        let id = self.cfg.collector_id.as_str();
        // Answered in the version the task came in.
        let bytes = codec::encode_as(Version::of(&msg.payload), &response);
        let (status, bytes) = if bytes.is_empty() {
            log::warn!("task answer could not be encoded");
            let failed = TaskResponse::failed(id, "the result could not be encoded");
            (TaskStatus::Failed, control::encode(&failed))
        } else {
            (response.status, bytes)
        };
        match self.client.reply(msg, &bytes) {
            Ok(()) => status,
            Err(ClientError::TooLarge { len, max }) => {
                let failed = TaskResponse::failed(
                    id,
                    format!(
                        "the result of {len} bytes exceeds the bus's maximum message of {max} bytes; \
                         narrow the request"
                    ),
                );
                if let Err(e) = self.client.reply(msg, &control::encode(&failed)) {
                    log::warn!("task reply on {:?} failed: {e}", msg.reply_to);
                }
                TaskStatus::Failed
            }
            Err(e) => {
                log::warn!("task reply on {:?} failed: {e}", msg.reply_to);
                status
            }
        }
    }
}
