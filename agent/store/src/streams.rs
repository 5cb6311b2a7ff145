//! Where a stream's watermark stands: placing a collector's stated
//! position, recording and refuting gaps, advancing while contiguous
//! (see the crate docs' Watermarks).

use super::*;

/// The later of two stated positions (bases and next numbers only rise).
pub(super) fn latest(a: Option<StreamPosition>, b: Option<StreamPosition>) -> Option<StreamPosition> {
    match (a, b) {
        (Some(a), Some(b)) => Some(if (b.base, b.next) >= (a.base, a.next) { b } else { a }),
        (a, b) => a.or(b),
    }
}

/// Where a stream's watermark starts for what a collector sends now (see
/// [Watermarks](#watermarks)): its stored watermark, with what lies below
/// the collector's stated base recorded as a gap.
pub(super) fn place(
    tx: &rusqlite::Transaction<'_>,
    collector_id: &str,
    stream_id: u64,
    stored: Option<u64>,
    position: Option<StreamPosition>,
    min_seq: u64,
    gaps: &mut Vec<(StreamGapKey, String)>,
) -> Result<u64, StoreError> {
    let stream_sql = stream_to_sql(stream_id);
    let mut record = |from: u64, to: u64, reason: &str| -> Result<(), StoreError> {
        record_gap(tx, collector_id, stream_sql, from, to, reason)?;
        gaps.push((
            StreamGapKey { collector_id: collector_id.to_owned(), stream_id, from, to },
            reason.to_owned(),
        ));
        Ok(())
    };
    match (stored, position) {
        // A collector of an earlier release: its first seq, minus 1.
        (None, None) => Ok(min_seq.saturating_sub(1)),
        (None, Some(p)) => {
            if p.base > 1 {
                record(1, p.base - 1, REASON_BEFORE_BASE)?;
            }
            Ok(0)
        }
        (Some(w), Some(p)) if p.base <= p.next && w.saturating_add(1) < p.base => {
            record(w + 1, p.base - 1, REASON_BEHIND)?;
            Ok(w)
        }
        (Some(w), _) => Ok(w),
    }
}

/// Records `from..=to` as lost with `reason` (kept once per start).
pub(super) fn record_gap(
    tx: &rusqlite::Transaction<'_>,
    collector_id: &str,
    stream_sql: i64,
    from: u64,
    to: u64,
    reason: &str,
) -> Result<(), StoreError> {
    let observed = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64);
    tx.prepare_cached(INSERT_GAP)?.execute(params![
        collector_id,
        stream_sql,
        seq_floor(from),
        seq_floor(to),
        reason,
        observed
    ])?;
    Ok(())
}

/// The recorded gap that covers `seq`: start, end, reason.
pub(super) fn gap_at(
    tx: &rusqlite::Transaction<'_>,
    collector_id: &str,
    stream_sql: i64,
    seq: u64,
) -> Result<Option<(u64, u64, String)>, StoreError> {
    let found: Option<(i64, i64)> = tx
        .prepare_cached(SELECT_GAP_AT)?
        .query_row(params![collector_id, stream_sql, seq_floor(seq)], |r| Ok((r.get(0)?, r.get(1)?)))
        .optional()?;
    let Some((from, to)) = found else { return Ok(None) };
    let reason: String = tx.query_row(
        "SELECT reason FROM stream_gaps WHERE collector_id = ?1 AND stream_id = ?2 AND from_seq = ?3",
        params![collector_id, stream_sql, from],
        |r| r.get(0),
    )?;
    Ok(Some((to_u64(from, 0)?, to_u64(to, 1)?, reason)))
}

/// Cuts the gap `from..=to` before `seq`, which an event just proved was
/// not lost: what lay below stays recorded, the rest goes (an event above
/// will refute it again, or the watermark walks over stored rows).
pub(super) fn refute(
    tx: &rusqlite::Transaction<'_>,
    collector_id: &str,
    stream_sql: i64,
    from: u64,
    to: u64,
    seq: u64,
    reason: &str,
) -> Result<(), StoreError> {
    tx.execute(
        "DELETE FROM stream_gaps WHERE collector_id = ?1 AND stream_id = ?2 AND from_seq = ?3",
        params![collector_id, stream_sql, seq_floor(from)],
    )?;
    if from < seq {
        record_gap(tx, collector_id, stream_sql, from, seq - 1, reason)?;
    }
    let _ = to;
    tx.execute(
        "UPDATE stream_watermarks SET through = MIN(through, ?3) WHERE collector_id = ?1 AND stream_id = ?2",
        params![collector_id, stream_sql, seq_floor(seq - 1)],
    )?;
    Ok(())
}

/// Walks a stream's watermark up from `through` over contiguous stored
/// sequence numbers and recorded gaps.
pub(super) fn advance(
    tx: &rusqlite::Transaction<'_>,
    collector_id: &str,
    stream_sql: i64,
    mut through: u64,
) -> Result<u64, StoreError> {
    let mut seqs_above = tx.prepare_cached(SELECT_SEQS_ABOVE)?;
    let mut gap_covering = tx.prepare_cached(SELECT_GAP_COVERING)?;
    loop {
        let mut rows = seqs_above.query(params![collector_id, stream_sql, seq_floor(through)])?;
        while let Some(row) = rows.next()? {
            let seq = to_u64(row.get(0)?, 0)?;
            if Some(seq) != through.checked_add(1) {
                break;
            }
            through = seq;
        }
        drop(rows);
        let Some(next) = through.checked_add(1) else { return Ok(through) };
        let end: Option<i64> =
            gap_covering.query_row(params![collector_id, stream_sql, seq_floor(next)], |row| row.get(0))?;
        match end.map(|e| to_u64(e, 0)).transpose()? {
            Some(end) if end > through => through = end,
            _ => return Ok(through),
        }
    }
}
