//! The node's life: register, activate, heartbeat, pull instructions, answer them, and leave
//! cleanly — reconnecting with backoff whenever the SuperLink goes away.
//!
//! What the node does with an instruction is an [`InstructionHandler`]'s business; this
//! module only moves messages.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::error::{FlowerError, Result};
use crate::protocol::fleet::FleetClient;
use crate::protocol::message::{build_reply, instruction_content, seconds_left, Reply};
use crate::protocol::objects::{post_order, verify};
use crate::protocol::proto;
use crate::protocol::records::RecordDict;

/// What a node does with an instruction.
pub trait InstructionHandler {
    /// Answers an instruction of `message_type` (`train`, `evaluate`, …) in run `run_id`.
    /// `Err(reason)` is sent back to the server as an error reply.
    fn handle(
        &mut self,
        run_id: u64,
        message_type: &str,
        content: &RecordDict,
    ) -> std::result::Result<RecordDict, String>;
}

/// Timing of a node.
#[derive(Debug, Clone, PartialEq)]
pub struct NodeOptions {
    /// Seconds between heartbeats promised to the SuperLink (Flower's default: 30). The
    /// SuperLink declares a silent node offline after about twice this.
    pub heartbeat_interval: f64,
    /// Pause between two polls when no instruction waits.
    pub poll_interval: Duration,
    /// Longest pause between two reconnection attempts (the pause doubles from 1 s).
    pub max_backoff: Duration,
    /// Longest wait for an object the SuperLink says is not available yet.
    pub object_timeout: Duration,
}

impl Default for NodeOptions {
    fn default() -> Self {
        NodeOptions {
            heartbeat_interval: 30.0,
            poll_interval: Duration::from_millis(500),
            max_backoff: Duration::from_secs(30),
            object_timeout: Duration::from_secs(120),
        }
    }
}

/// What a node reports while it runs (for logs).
#[derive(Debug, Clone, PartialEq)]
pub enum NodeEvent {
    /// Registered and active.
    Connected {
        /// The id the SuperLink gave this node.
        node_id: u64,
    },
    /// An instruction arrived and its objects were verified.
    Received {
        /// Run id.
        run_id: u64,
        /// `train`, `evaluate`, …
        message_type: String,
        /// The round (Flower's group id).
        group: String,
    },
    /// A reply was pushed.
    Replied {
        /// Run id.
        run_id: u64,
        /// `train`, `evaluate`, …
        message_type: String,
        /// Seconds spent handling the instruction.
        seconds: f64,
        /// `Some(reason)` if the reply was an error.
        error: Option<String>,
    },
    /// An instruction was not answered.
    Skipped {
        /// Why.
        reason: String,
    },
    /// The connection was lost; the node retries after `wait`.
    Reconnecting {
        /// What went wrong.
        reason: String,
        /// Pause before the next attempt.
        wait: Duration,
    },
    /// Deactivated. The node stays registered, so the same key can come back: flwr 1.42
    /// never lets a key that unregistered register again.
    Left,
}

/// A Flower node. See the module documentation.
pub struct FlowerNode<H> {
    client: FleetClient,
    handler: H,
    options: NodeOptions,
    last_push: Option<Instant>,
}

impl<H: InstructionHandler> FlowerNode<H> {
    /// A node that will talk through `client` and answer with `handler`.
    pub fn new(client: FleetClient, handler: H, options: NodeOptions) -> Self {
        FlowerNode {
            client,
            handler,
            options,
            last_push: None,
        }
    }

    /// The handler.
    pub fn handler(&self) -> &H {
        &self.handler
    }

    /// Runs until `stop` is set (then deactivates, staying registered) or an error that
    /// reconnecting cannot fix. Connection losses are retried forever with backoff.
    pub fn run(&mut self, stop: &AtomicBool, mut on_event: impl FnMut(NodeEvent)) -> Result<()> {
        let mut backoff = Duration::from_secs(1);
        let mut previous: Option<u64> = None;
        while !stop.load(Ordering::SeqCst) {
            if let Some(old) = previous.take() {
                // Best effort: a SuperLink that still knows the old session frees it.
                let _ = self.client.deactivate(old);
            }
            let node_id = match self.connect() {
                Ok(id) => id,
                // E.g. a restarted node whose previous process the SuperLink still counts
                // as online: activation works once its heartbeat deadline has passed.
                Err(e) if e.is_retryable() => {
                    self.back_off(stop, &mut backoff, &e, &mut on_event);
                    continue;
                }
                Err(e) => return Err(e),
            };
            backoff = Duration::from_secs(1);
            on_event(NodeEvent::Connected { node_id });
            let heartbeat = Heartbeat::start(
                self.client.clone(),
                node_id,
                self.options.heartbeat_interval,
            );
            let outcome = self.serve(node_id, stop, &heartbeat.lost, &mut on_event);
            heartbeat.stop();
            match outcome {
                Ok(()) => break,
                Err(e) if e.is_connection_lost() => {
                    previous = Some(node_id);
                    self.back_off(stop, &mut backoff, &e, &mut on_event);
                }
                Err(e) => {
                    self.leave(node_id);
                    return Err(e);
                }
            }
        }
        Ok(())
    }

    /// Reports `error`, waits `backoff` (or until `stop`), and doubles it up to the maximum.
    fn back_off(
        &self,
        stop: &AtomicBool,
        backoff: &mut Duration,
        error: &FlowerError,
        on_event: &mut impl FnMut(NodeEvent),
    ) {
        on_event(NodeEvent::Reconnecting {
            reason: error.to_string(),
            wait: *backoff,
        });
        sleep_unless(stop, *backoff);
        *backoff = (*backoff * 2).min(self.options.max_backoff);
    }

    /// Register (a key the SuperLink already knows is fine) and activate.
    fn connect(&self) -> Result<u64> {
        match self.client.register() {
            Ok(_) => {}
            // Already registered (a restarted node that kept its key): activation decides.
            Err(FlowerError::Rejected { .. }) => {}
            Err(e) => return Err(e),
        }
        self.client.activate(self.options.heartbeat_interval)
    }

    fn leave(&self, node_id: u64) {
        // Best effort: the SuperLink may already be gone. No unregistering: flwr 1.42 refuses
        // a key that unregistered for ever ("No SuperNode found"), so a site that restarts
        // after a clean stop could never rejoin with its key.
        let _ = self.client.deactivate(node_id);
    }

    fn serve(
        &mut self,
        node_id: u64,
        stop: &AtomicBool,
        heartbeat_lost: &AtomicBool,
        on_event: &mut impl FnMut(NodeEvent),
    ) -> Result<()> {
        loop {
            if stop.load(Ordering::SeqCst) {
                // The SuperLink replaces the reply of a node that went offline before the
                // server app collected it; give the app time to collect the last one.
                if let Some(at) = self.last_push {
                    let settle = Duration::from_secs(5);
                    if at.elapsed() < settle {
                        std::thread::sleep(settle - at.elapsed());
                    }
                }
                self.leave(node_id);
                on_event(NodeEvent::Left);
                return Ok(());
            }
            if heartbeat_lost.load(Ordering::SeqCst) {
                return Err(FlowerError::Rejected {
                    rpc: "send-node-heartbeat".into(),
                    status: 404,
                    message: "the SuperLink no longer knows this node".into(),
                });
            }
            let pulled = match self.client.pull_messages(node_id) {
                Ok(pulled) => pulled,
                Err(e) if e.is_connection_lost() => return Err(e),
                Err(e) => {
                    on_event(NodeEvent::Skipped {
                        reason: format!("pulling instructions failed: {e}"),
                    });
                    sleep_unless(stop, self.options.poll_interval * 4);
                    continue;
                }
            };
            match (
                pulled.messages_list.into_iter().next(),
                pulled.message_object_trees.into_iter().next(),
            ) {
                (Some(message), Some(tree)) => self.answer(node_id, message, tree, on_event)?,
                _ => sleep_unless(stop, self.options.poll_interval),
            }
        }
    }

    /// Pulls and verifies an instruction's objects, lets the handler answer, pushes the reply.
    /// Errors of the instruction itself become error replies or skips; only connection
    /// errors are returned.
    fn answer(
        &mut self,
        node_id: u64,
        message: proto::Message,
        tree: proto::ObjectTree,
        on_event: &mut impl FnMut(NodeEvent),
    ) -> Result<()> {
        let Some(metadata) = message.metadata else {
            on_event(NodeEvent::Skipped {
                reason: "an instruction without metadata".into(),
            });
            return Ok(());
        };
        if seconds_left(&metadata) <= 0.0 {
            on_event(NodeEvent::Skipped {
                reason: format!("instruction {} expired", metadata.message_id),
            });
            return Ok(());
        }
        let run_id = metadata.run_id;
        let objects = match self.pull_objects(node_id, run_id, &tree) {
            Ok(objects) => objects,
            Err(e) if e.is_connection_lost() => return Err(e),
            Err(e) => {
                // Never act on content that failed verification; tell the server why.
                let reason = format!("refused instruction {}: {e}", metadata.message_id);
                on_event(NodeEvent::Skipped {
                    reason: reason.clone(),
                });
                let reply = build_reply(&metadata, node_id, Err(&reason))?;
                return match self.push(node_id, run_id, reply) {
                    Err(e) if e.is_connection_lost() => Err(e),
                    _ => Ok(()),
                };
            }
        };
        if let Err(e) = self
            .client
            .confirm_received(node_id, run_id, &metadata.message_id)
        {
            if e.is_connection_lost() {
                return Err(e);
            }
            on_event(NodeEvent::Skipped {
                reason: format!("cannot confirm {}: {e}", metadata.message_id),
            });
            return Ok(());
        }
        on_event(NodeEvent::Received {
            run_id,
            message_type: metadata.message_type.clone(),
            group: metadata.group_id.clone(),
        });
        let start = Instant::now();
        let outcome = match instruction_content(&metadata.message_id, &objects) {
            Ok(content) => {
                let handler = &mut self.handler;
                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    handler.handle(run_id, &metadata.message_type, &content)
                }))
                .unwrap_or_else(|_| Err("the node's handler panicked".to_string()))
            }
            Err(e) => Err(e.to_string()),
        };
        let seconds = start.elapsed().as_secs_f64();
        if seconds_left(&metadata) <= 0.0 {
            on_event(NodeEvent::Skipped {
                reason: format!(
                    "instruction {} expired while it was handled ({seconds:.1} s)",
                    metadata.message_id
                ),
            });
            return Ok(());
        }
        let reply = build_reply(&metadata, node_id, outcome.as_ref().map_err(String::as_str))?;
        match self.push(node_id, run_id, reply) {
            Ok(()) => {}
            Err(e) if e.is_connection_lost() => return Err(e),
            Err(e) => {
                on_event(NodeEvent::Skipped {
                    reason: format!("the reply to {} was refused: {e}", metadata.message_id),
                });
                return Ok(());
            }
        }
        on_event(NodeEvent::Replied {
            run_id,
            message_type: metadata.message_type,
            seconds,
            error: outcome.err(),
        });
        Ok(())
    }

    fn pull_objects(
        &self,
        node_id: u64,
        run_id: u64,
        tree: &proto::ObjectTree,
    ) -> Result<HashMap<String, Vec<u8>>> {
        let mut objects = HashMap::new();
        for id in post_order(tree) {
            let deadline = Instant::now() + self.options.object_timeout;
            let content = loop {
                if let Some(bytes) = self.client.pull_object(node_id, run_id, &id)? {
                    break bytes;
                }
                if Instant::now() > deadline {
                    return Err(FlowerError::protocol(format!(
                        "object {id} still unavailable after {:?}",
                        self.options.object_timeout
                    )));
                }
                std::thread::sleep(Duration::from_millis(100));
            };
            verify(&id, &content)?;
            objects.insert(id, content);
        }
        Ok(objects)
    }

    fn push(&mut self, node_id: u64, run_id: u64, reply: Reply) -> Result<()> {
        let (wanted, session) =
            self.client
                .push_message(node_id, reply.message, reply.tree.clone(), 0.0)?;
        let wanted: HashSet<String> = wanted.into_iter().collect();
        for id in post_order(&reply.tree) {
            if !wanted.contains(&id) {
                continue;
            }
            let content = reply
                .objects
                .get(&id)
                .ok_or_else(|| FlowerError::protocol(format!("reply object {id} missing")))?;
            self.client
                .push_object(node_id, run_id, &session, &id, content.to_vec())?;
        }
        self.last_push = Some(Instant::now());
        Ok(())
    }
}

/// Sleeps `total`, waking early when `stop` is set.
fn sleep_unless(stop: &AtomicBool, total: Duration) {
    let end = Instant::now() + total;
    while !stop.load(Ordering::SeqCst) && Instant::now() < end {
        std::thread::sleep(Duration::from_millis(50).min(end - Instant::now()));
    }
}

/// Background heartbeats; sets `lost` when the SuperLink stops recognising the node.
struct Heartbeat {
    stop: Arc<AtomicBool>,
    lost: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Heartbeat {
    fn start(client: FleetClient, node_id: u64, interval: f64) -> Heartbeat {
        let stop = Arc::new(AtomicBool::new(false));
        let lost = Arc::new(AtomicBool::new(false));
        let (s, l) = (stop.clone(), lost.clone());
        // Beat at a third of the promised interval so one slow call does not make the node
        // look dead.
        let period = Duration::from_secs_f64((interval / 3.0).max(0.2));
        let thread = std::thread::spawn(move || {
            let mut failures = 0;
            while !s.load(Ordering::SeqCst) {
                sleep_unless(&s, period);
                if s.load(Ordering::SeqCst) {
                    break;
                }
                match client.heartbeat(node_id, interval) {
                    Ok(true) => failures = 0,
                    Ok(false) => {
                        l.store(true, Ordering::SeqCst);
                        break;
                    }
                    Err(e) if e.is_connection_lost() => {
                        failures += 1;
                        if failures >= 3 {
                            l.store(true, Ordering::SeqCst);
                            break;
                        }
                    }
                    Err(_) => failures += 1,
                }
            }
        });
        Heartbeat {
            stop,
            lost,
            thread: Some(thread),
        }
    }

    fn stop(mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
