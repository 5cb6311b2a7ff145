//! Retention: [`EventStore::prune`] and [`Pruning`], deleting in bounded
//! chunks and counting what each output had not sent.

use super::*;

impl EventStore {
    /// Deletes events beyond `retention`: those observed longer than
    /// `max_age` ago, then the oldest (lowest ids) beyond `max_events`.
    /// Returns the number of rows deleted. Watermarks are kept, so a
    /// pruned event replayed by its collector is still a duplicate.
    ///
    /// Deletes in chunks of at most [`PRUNE_CHUNK`] rows, each its own
    /// transaction (see [`Pruning`]); [`EventStore::prune_step`] does one
    /// chunk, for a caller with other writes to make between them.
    pub fn prune(&mut self, retention: &Retention) -> Result<u64, StoreError> {
        let mut pruning = Pruning::new(retention);
        self.prune_all(&mut pruning)
    }

    /// [`EventStore::prune`] with the current time given.
    #[cfg(test)]
    pub(super) fn prune_at(&mut self, retention: &Retention, now_ms: u64) -> Result<u64, StoreError> {
        let mut pruning = Pruning::at(retention, now_ms);
        self.prune_all(&mut pruning)
    }

    pub(super) fn prune_all(&mut self, pruning: &mut Pruning) -> Result<u64, StoreError> {
        while !pruning.is_done() {
            self.prune_step(pruning)?;
        }
        if pruning.deleted > 0 {
            log::debug!(
                "pruned {} events from {} in {} transactions",
                pruning.deleted,
                self.path.display(),
                pruning.transactions
            );
        }
        Ok(pruning.deleted)
    }

    /// Deletes the next chunk of `pruning` (at most its chunk size, in one
    /// immediate transaction) and returns how many rows it deleted; with
    /// [`Pruning::is_done`] nothing is left. A phase with nothing to delete
    /// may end with a step that deletes nothing. On error nothing of the
    /// chunk is deleted and `pruning` is where it was.
    pub fn prune_step(&mut self, pruning: &mut Pruning) -> Result<u64, StoreError> {
        let chunk = clamp_i64(pruning.chunk as u64);
        // A limit not set is no phase.
        if pruning.phase == PrunePhase::Age && pruning.cutoff_ms.is_none() {
            pruning.phase = PrunePhase::Count(None);
        }
        if matches!(pruning.phase, PrunePhase::Count(_)) && pruning.max_events.is_none() {
            pruning.phase = PrunePhase::Done;
        }
        let deleted = match pruning.phase {
            PrunePhase::Done => return Ok(0),
            PrunePhase::Age => {
                let Some(cutoff) = pruning.cutoff_ms else {
                    return Ok(0);
                };
                // Through the observed_ms index: a chunk reads what it
                // deletes, not the table.
                let tx = self.conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
                let n = delete_counted(
                    &tx,
                    "SELECT id FROM process_events WHERE observed_ms < ?1 LIMIT ?2",
                    params![cutoff, chunk],
                )?;
                tx.commit()?;
                if n < pruning.chunk {
                    pruning.phase = PrunePhase::Count(None);
                }
                n
            }
            PrunePhase::Count(boundary) => {
                let Some(max_events) = pruning.max_events else {
                    return Ok(0);
                };
                let tx = self.conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
                // The id of the newest row that must go, if there are more
                // than max_events rows (fixed once the age phase is over,
                // so rows committed between chunks are not counted in).
                let boundary = match boundary {
                    Some(b) => b,
                    None => {
                        let found: Option<i64> = tx
                            .query_row(
                                "SELECT id FROM process_events ORDER BY id DESC LIMIT 1 OFFSET ?1",
                                params![clamp_i64(max_events)],
                                |r| r.get(0),
                            )
                            .optional()?;
                        let Some(b) = found else {
                            tx.commit()?;
                            pruning.phase = PrunePhase::Done;
                            return Ok(0);
                        };
                        b
                    }
                };
                let n = delete_counted(
                    &tx,
                    "SELECT id FROM process_events WHERE id <= ?1 ORDER BY id LIMIT ?2",
                    params![boundary, chunk],
                )?;
                tx.commit()?;
                pruning.phase =
                    if n < pruning.chunk { PrunePhase::Done } else { PrunePhase::Count(Some(boundary)) };
                n
            }
        };
        pruning.transactions += 1;
        let n = u64::try_from(deleted).unwrap_or(u64::MAX);
        pruning.deleted = pruning.deleted.saturating_add(n);
        Ok(n)
    }
}

/// Deletes the rows `select` names (one column of ids) inside `tx`, after
/// adding the ones each output has not sent to its `lost`
/// ([`outputs`]): the ids go through `temp.prune_ids`, so the count and
/// the delete see the same rows.
pub(super) fn delete_counted(
    tx: &Connection,
    select: &str,
    params: impl rusqlite::Params,
) -> rusqlite::Result<usize> {
    tx.execute_batch(
        "CREATE TEMP TABLE IF NOT EXISTS prune_ids (id INTEGER PRIMARY KEY); DELETE FROM temp.prune_ids;",
    )?;
    tx.execute(&format!("INSERT INTO temp.prune_ids {select}"), params)?;
    outputs::count_lost(tx)?;
    let n = tx.execute("DELETE FROM process_events WHERE id IN (SELECT id FROM temp.prune_ids)", [])?;
    tx.execute("DELETE FROM temp.prune_ids", [])?;
    Ok(n)
}

/// Rows [`EventStore::prune`] deletes per transaction.
pub const PRUNE_CHUNK: usize = 10_000;

/// A retention pass in progress ([`EventStore::prune_step`]). It deletes in
/// chunks of at most [`PRUNE_CHUNK`] rows, each its own transaction, so a
/// large prune (the first after an upgrade, a lowered `max_events`) never
/// holds the write lock long, and the store writer commits batches between
/// chunks. First the events observed before the cutoff (now minus
/// `max_age`, fixed when the pass starts), through the `observed_ms` index;
/// then, by id ranges from the lowest, the oldest beyond `max_events`, the
/// boundary id fixed when the age phase is over: what one prune at that
/// moment would keep. Rows committed during the pass are newer than that
/// boundary; the next pass counts them.
#[derive(Debug, Clone)]
pub struct Pruning {
    cutoff_ms: Option<i64>,
    max_events: Option<u64>,
    pub(super) phase: PrunePhase,
    pub(super) chunk: usize,
    deleted: u64,
    transactions: u64,
}

/// Where a [`Pruning`] is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum PrunePhase {
    /// Deleting events older than the cutoff.
    Age,
    /// Deleting the oldest ids up to the boundary (`None`: not found yet).
    Count(Option<i64>),
    Done,
}

impl Pruning {
    /// A pass of `retention` from now.
    pub fn new(retention: &Retention) -> Pruning {
        let now_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        Pruning::at(retention, now_ms)
    }

    /// A pass of `retention` at `now_ms` (Unix milliseconds).
    pub(super) fn at(retention: &Retention, now_ms: u64) -> Pruning {
        let cutoff_ms = retention.max_age.map(|max_age| {
            let age_ms = u64::try_from(max_age.as_millis()).unwrap_or(u64::MAX);
            clamp_i64(now_ms.saturating_sub(age_ms))
        });
        let phase = if cutoff_ms.is_none() && retention.max_events.is_none() {
            PrunePhase::Done
        } else {
            PrunePhase::Age
        };
        Pruning {
            cutoff_ms,
            max_events: retention.max_events,
            phase,
            chunk: PRUNE_CHUNK,
            deleted: 0,
            transactions: 0,
        }
    }

    /// Nothing is left to delete.
    pub fn is_done(&self) -> bool {
        self.phase == PrunePhase::Done
    }

    /// Rows deleted so far.
    pub fn deleted(&self) -> u64 {
        self.deleted
    }

    /// Transactions (chunks) committed so far.
    pub fn transactions(&self) -> u64 {
        self.transactions
    }
}

#[cfg(test)]
mod tests;
