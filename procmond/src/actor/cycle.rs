//! The actor's collection cycle: the walk and its reconciliation with the
//! kernel path's observations, the checkpoint, and delivery of the events
//! to the sink (see the parent module's "Events and the cycle").

use super::*;

impl Actor {
    /// A batch or a resync request from the kernel thread.
    pub(super) fn kernel_message(&mut self, msg: KernelMessage) {
        match msg {
            KernelMessage::Batch(mut observations) => {
                // Behind: take what else is queued too, for one submission.
                let more: Vec<KernelMessage> =
                    self.kernel.as_ref().map(|k| k.rx.try_iter().take(16).collect()).unwrap_or_default();
                let mut rest = Vec::new();
                for m in more {
                    match m {
                        KernelMessage::Batch(b) => observations.extend(b),
                        other => rest.push(other),
                    }
                }
                self.apply_kernel(observations);
                for m in rest {
                    self.kernel_message(m);
                }
            }
            // The answer to a sync that timed out: nothing to do.
            KernelMessage::Synced { .. } => {}
            KernelMessage::Resync { reason } => {
                // An early walk, but not more often than RESYNC_GAP.
                if let Some(at) = self.next_cycle {
                    let soonest = self.last_walk.map_or_else(Instant::now, |w| w + RESYNC_GAP);
                    log::info!("resync requested ({reason}): reconciling with a walk");
                    self.next_cycle = Some(at.min(soonest.max(Instant::now())));
                }
            }
        }
    }

    /// The kernel thread ended on its own: the walk alone reports now.
    pub(super) fn kernel_lost(&mut self) {
        log::error!("the kernel event thread stopped; events come from the periodic walk alone from now on");
        self.kernel = None;
        self.opts.kernel_fallback = Some("the kernel event thread stopped".into());
    }

    /// Applies kernel observations once the first walk has set the scene;
    /// before it (waiting for the agent) they are not monitoring yet.
    pub(super) fn apply_kernel(&mut self, observations: Vec<Observation>) {
        if self.state != CollectorState::Running || self.n.cycles == 0 {
            return;
        }
        let mut events = Vec::new();
        self.apply_kernel_now(observations, &mut events);
        self.deliver(events);
    }

    /// Everything the kernel thread and its channel hold, in order; and
    /// the start time of the oldest fork it still holds.
    pub(super) fn kernel_sync(&mut self) -> (Vec<Observation>, Option<u64>) {
        let Some(link) = &self.kernel else { return (Vec::new(), None) };
        let synced = link.sync(SYNC_TIMEOUT);
        if !synced.answered {
            log::warn!(
                "the kernel event thread did not answer within {SYNC_TIMEOUT:?}; walking without its barrier"
            );
        }
        if let Some(reason) = synced.resync {
            self.kernel_message(KernelMessage::Resync { reason });
        }
        (synced.observations, synced.oldest_pending)
    }

    /// One collection cycle: apply a staged configuration, enumerate,
    /// track, hash, submit. With kernel events it is a reconciliation:
    /// a barrier before the walk (what happened before it is applied),
    /// the walk, a barrier after it (what happened during it is applied,
    /// and is newer than the walk), then the comparison.
    pub(super) fn cycle(&mut self) {
        let start = Instant::now();
        if let Some(next) = self.staged.take() {
            self.apply(next);
        }
        self.next_cycle = Some(start + self.interval());
        self.last_walk = Some(start);
        let mut events = if self.n.cycles == 0 { self.restore() } else { Vec::new() };
        // The first walk is a snapshot, unless a restart restored what was
        // reported before: then it is compared with that.
        let first = self.n.cycles == 0 && !self.tracker.is_restored();
        let mut cutoff = None;
        if self.kernel.is_some() {
            let (before, oldest_pending) = self.kernel_sync();
            // Before the first walk nothing is monitored yet: it takes every
            // process it lists (the kernel's events before it were not
            // applied, so it cannot leave any to them).
            if self.n.cycles > 0 {
                self.apply_kernel_now(before, &mut events);
                let now = self.source.start_time_now();
                cutoff = match (now, oldest_pending) {
                    (Some(a), Some(b)) => Some(a.min(b)),
                    (a, b) => a.or(b),
                };
            }
        }
        self.tracker.begin_walk();
        let mut records = match self.source.refresh() {
            Ok(r) => r,
            Err(e) => {
                self.n.errors += 1;
                log::error!("process enumeration failed: {e}");
                self.deliver(events);
                return;
            }
        };
        if !self.cfg.excluded_pids.is_empty() {
            records.retain(|r| !self.cfg.excluded_pids.contains(&r.pid));
        }
        let records_len = records.len();
        // Over max_processes the tracker compares the newest unreported
        // processes first and still stops only what the whole list lacks.
        let walk = Walk { max_processes: self.cfg.max_processes, kernel: self.kernel.is_some(), cutoff };
        let during = if self.kernel.is_some() { self.kernel_sync().0 } else { Vec::new() };
        let mut budget_started = false;
        if first {
            // The snapshot first, then what happened during the walk. The
            // snapshot's Started events are built and submitted a chunk at
            // a time: never all of them in memory at once.
            events.extend(self.tracker.reconcile(records, unix_ms(), walk));
            if self.cfg.compute_hashes {
                self.hasher.start_cycle();
            }
            budget_started = true;
            self.deliver_part(std::mem::take(&mut events), false);
            loop {
                let chunk = self.tracker.next_snapshot_events(SUBMIT_CHUNK);
                if chunk.is_empty() || self.state == CollectorState::Stopped {
                    break;
                }
                if self.unsent.is_empty() {
                    self.deliver_part(chunk, false);
                } else {
                    // A submit failed this cycle: the rest waits with it
                    // for the next cycle, as one list would have.
                    self.hold(chunk);
                }
            }
            self.apply_kernel_now(during, &mut events);
        } else {
            self.apply_kernel_now(during, &mut events);
            events.extend(self.tracker.reconcile(records, unix_ms(), walk));
        }
        self.n.cycles += 1;
        self.n.processes = self.tracker.last_cut().map_or(records_len, |c| c.compared) as u64;
        self.note_cut();
        self.deliver_part(events, !budget_started);
        self.checkpoint();
        self.n.last_cycle_us = start.elapsed().as_micros() as u64;
        self.n.last_collection_unix_ms = Some(unix_ms());
        log::debug!(
            "cycle {}: {} processes in {} us, {} tracked",
            self.n.cycles,
            self.n.processes,
            self.n.last_cycle_us,
            self.tracker.len()
        );
    }

    /// Counts a walk cut at `max_processes` (an error in health reports;
    /// the heartbeat says Degraded while the last walk was cut) and warns,
    /// at most once a minute with the count since the last warning; says
    /// when the list fits again.
    pub(super) fn note_cut(&mut self) {
        let Some(cut) = self.tracker.last_cut() else {
            if self.cuts.since_warning > 0 || self.cuts.last_warning.is_some() {
                log::info!(
                    "the process list fits in max_processes {} again ({} processes)",
                    self.cfg.max_processes,
                    self.n.processes
                );
                self.cuts.since_warning = 0;
                self.cuts.last_warning = None;
            }
            return;
        };
        self.n.errors += 1;
        self.cuts.total += 1;
        self.cuts.since_warning += 1;
        let due = self.cuts.last_warning.is_none_or(|at| at.elapsed() >= CUT_WARNING_EVERY);
        if due {
            log::warn!(
                "walk truncated: {} processes listed, over max_processes {}: {} were not compared this cycle \
                 ({} truncated cycle(s) since the last warning, {} since start); new processes are compared \
                 first, and only processes the whole list lacks are reported Stopped",
                cut.listed,
                self.cfg.max_processes,
                cut.listed - cut.compared,
                self.cuts.since_warning,
                self.cuts.total
            );
            self.cuts.since_warning = 0;
            self.cuts.last_warning = Some(Instant::now());
        }
    }

    /// Rebuilds what a previous run reported from the checkpoint and the
    /// sink's events after it. Returns late Stopped events when the host
    /// rebooted meanwhile (everything it reported ended).
    pub(super) fn restore(&mut self) -> Vec<ProcessEvent> {
        let Some(path) = self.opts.checkpoint.clone() else { return Vec::new() };
        let cp = match crate::checkpoint::read(&path) {
            Ok(Some(cp)) => cp,
            Ok(None) => {
                log::info!("no checkpoint at {}: the first walk is a snapshot", path.display());
                return Vec::new();
            }
            Err(e) => {
                self.n.errors += 1;
                log::error!("checkpoint unusable ({e}): the first walk is a snapshot");
                return Vec::new();
            }
        };
        let (stream, _) = self.sink.position();
        if cp.stream_id != stream || cp.backend != self.source.backend() {
            log::warn!(
                "checkpoint of stream {} ({}) does not belong to stream {stream} ({}): the first walk is a snapshot",
                cp.stream_id,
                cp.backend,
                self.source.backend()
            );
            return Vec::new();
        }
        let mut state: std::collections::HashMap<_, _> =
            cp.processes.into_iter().map(|p| (p.key(), p)).collect();
        let mut down_since = cp.written_unix_ms;
        let after = match self.sink.events_after(cp.through_seq) {
            Ok(events) => events,
            Err(e) => {
                self.n.errors += 1;
                log::error!("reading the events after checkpoint seq {}: {e}", cp.through_seq);
                Vec::new()
            }
        };
        let replayed = after.len();
        for e in after {
            down_since = down_since.max(e.observed_unix_ms);
            match e.kind {
                EventKind::Stopped => state.remove(&e.process.key()),
                EventKind::Started | EventKind::Modified => state.insert(e.process.key(), e.process),
            };
        }
        let processes: Vec<_> = state.into_values().collect();
        if daemoneye_platform::boot_id().as_deref() != Some(cp.boot_id.as_str()) {
            log::info!(
                "the host rebooted since the checkpoint: the {} processes reported then all ended (late Stopped); the first walk is a snapshot",
                processes.len()
            );
            let window = daemoneye_contract::event::LateWindow {
                after_unix_ms: down_since,
                before_unix_ms: unix_ms(),
            };
            return self.tracker.stopped_late(processes, window);
        }
        log::info!(
            "restored {} reported processes from the checkpoint through seq {} and {replayed} events after it; \
             what changed while procmond was down is reported late",
            processes.len(),
            cp.through_seq
        );
        self.tracker.restore(processes, down_since);
        Vec::new()
    }

    /// Saves what was reported, when something was since the last save and
    /// every event is durable (a failed submit leaves the state ahead).
    pub(super) fn checkpoint(&mut self) {
        let Some(path) = self.opts.checkpoint.clone() else { return };
        if !self.unsent.is_empty() || self.checkpointed_at_events == Some(self.n.events) {
            return;
        }
        let (stream_id, through_seq) = self.sink.position();
        let boot_id = daemoneye_platform::boot_id().unwrap_or_default();
        let header = crate::checkpoint::Header {
            boot_id: &boot_id,
            backend: self.source.backend(),
            stream_id,
            through_seq,
            written_unix_ms: unix_ms(),
        };
        // Borrowed: the tracker's records are encoded, never copied.
        let processes = self.tracker.reported();
        match crate::checkpoint::write_records(&path, header, &processes) {
            Ok(()) => {
                self.checkpointed_at_events = Some(self.n.events);
                self.sink.checkpointed(through_seq);
                log::debug!("checkpoint: {} processes through seq {through_seq}", processes.len());
            }
            Err(e) => {
                self.n.errors += 1;
                log::error!("checkpoint not written: {e}");
            }
        }
    }

    pub(super) fn apply_kernel_now(
        &mut self,
        mut observations: Vec<Observation>,
        events: &mut Vec<ProcessEvent>,
    ) {
        if !self.cfg.excluded_pids.is_empty() {
            observations.retain(|o| match o {
                Observation::Process { record, .. } => !self.cfg.excluded_pids.contains(&record.pid),
                Observation::Exit(x) => !self.cfg.excluded_pids.contains(&x.pid),
            });
        }
        if !observations.is_empty() {
            events.extend(self.tracker.apply_kernel(observations, unix_ms()));
        }
    }

    /// Hashes what needs it, counts, and submits (with what a failed
    /// submit left).
    pub(super) fn deliver(&mut self, events: Vec<ProcessEvent>) {
        self.deliver_part(events, true);
    }

    /// [`Actor::deliver`], starting the hash budget only with
    /// `start_budget` (a cycle delivering in parts starts it once).
    pub(super) fn deliver_part(&mut self, mut events: Vec<ProcessEvent>, start_budget: bool) {
        if self.cfg.compute_hashes && !events.is_empty() {
            if start_budget {
                self.hasher.start_cycle();
            }
            self.hash_events(&mut events);
        }
        self.n.events += events.len() as u64;
        if !self.unsent.is_empty() {
            let mut all = std::mem::take(&mut self.unsent);
            all.extend(events);
            events = all;
        }
        if !events.is_empty() {
            self.submit(events);
        }
    }

    /// Hashes the executables of Started events and of execs.
    fn hash_events(&mut self, events: &mut [ProcessEvent]) {
        for e in events {
            let wants = e.kind == EventKind::Started
                || (e.kind == EventKind::Modified && e.changes.contains(&Change::Exec));
            if wants {
                let d = &e.process.details;
                e.sha256 = Some(self.hasher.hash(e.process.pid, &d.exe, &d.exe_file));
            }
        }
    }

    /// Keeps events for the next cycle's retry behind those a failed
    /// submit left (hashed and counted as [`Actor::deliver`] would).
    pub(super) fn hold(&mut self, mut events: Vec<ProcessEvent>) {
        if self.cfg.compute_hashes {
            self.hash_events(&mut events);
        }
        self.n.events += events.len() as u64;
        self.unsent.append(&mut events);
        if self.unsent.len() > MAX_UNSENT {
            let lost = self.unsent.len() - MAX_UNSENT;
            log::error!("dropping the {lost} oldest undeliverable events (over {MAX_UNSENT})");
            self.unsent.drain(..lost);
        }
    }

    /// Hands a cycle's events to the sink in chunks of [`SUBMIT_CHUNK`]
    /// (one WAL append and fsync each), so a 10,000-process snapshot never
    /// has all its encoded copies in memory at once. What a chunk failure
    /// leaves is kept, in order, for the next cycle.
    pub(super) fn submit(&mut self, events: Vec<ProcessEvent>) {
        // Chunks are taken off the front of one iterator: the rest is
        // neither copied per chunk nor cloned (only the chunk in hand is,
        // for a retry).
        let mut events = events.into_iter();
        while events.len() > 0 {
            let chunk: Vec<ProcessEvent> = events.by_ref().take(SUBMIT_CHUNK).collect();
            let kept = chunk.clone();
            match self.sink.submit(chunk) {
                Ok(envelopes) => {
                    if let Some(observe) = &mut self.opts.observer {
                        envelopes.iter().for_each(&mut *observe);
                    }
                }
                Err(e) if e.fatal => {
                    self.n.errors += 1;
                    log::error!(
                        "{} events could not be made durable ({e}); stopping so a restart can recover",
                        kept.len() + events.len()
                    );
                    self.state = CollectorState::Stopped;
                    return;
                }
                Err(e) => {
                    self.n.errors += 1;
                    log::error!(
                        "{} events could not be made durable ({e}); retrying next cycle",
                        kept.len() + events.len()
                    );
                    let mut unsent = kept;
                    unsent.extend(events);
                    if unsent.len() > MAX_UNSENT {
                        let lost = unsent.len() - MAX_UNSENT;
                        log::error!("dropping the {lost} oldest undeliverable events (over {MAX_UNSENT})");
                        unsent.drain(..lost);
                    }
                    self.unsent = unsent;
                    return;
                }
            }
        }
    }

    pub(super) fn flush_unsent(&mut self) -> Result<(), String> {
        if self.unsent.is_empty() {
            return Ok(());
        }
        let events = std::mem::take(&mut self.unsent);
        self.sink.submit(events).map(|_| ()).map_err(|e| e.message)
    }
}
