//! Reading the log back in order: replay at start-up, and followers (history) behind the writer.
//!
//! A reader sees the segments and the acknowledged end as they were when it was created, and never
//! reads past that end, so it cannot meet a group the writer is still writing. It streams one record
//! at a time (a 256 KiB buffer), so replaying gigabytes costs no more memory than one record.

use super::codec;
use super::segment::{SegmentReader, Step, HEADER_LEN};
use super::{Batch, Lsn, WalError};
use std::path::PathBuf;

/// Every record with an end LSN above `after`, in order, decoded. Stops after the first error.
pub struct WalReader {
    dir: PathBuf,
    /// Start LSNs of the segments still to open, ascending; `next` indexes the first of them.
    segments: Vec<Lsn>,
    next: usize,
    current: Option<SegmentReader>,
    after: Lsn,
    limit: Lsn,
    done: bool,
}

impl WalReader {
    /// A reader over `segments` (start LSNs, ascending, non-empty) of `dir` up to `limit`.
    pub(super) fn new(
        dir: PathBuf,
        segments: Vec<Lsn>,
        after: Lsn,
        limit: Lsn,
    ) -> Result<WalReader, WalError> {
        let first = segments.first().copied().unwrap_or(0);
        if after < first {
            return Err(WalError::Removed { after, first });
        }
        // The segment holding the first record after `after`: the last one starting at or before it.
        let next = segments.partition_point(|&s| s <= after).saturating_sub(1);
        Ok(WalReader {
            dir,
            segments,
            next,
            current: None,
            after,
            limit,
            done: after >= limit,
        })
    }

    /// Opens the next segment, positioned at the first record that may end after `after`; false
    /// when there is none.
    fn open_next(&mut self) -> Result<bool, WalError> {
        let Some(&start) = self.segments.get(self.next) else {
            return Ok(false);
        };
        if start >= self.limit {
            return Ok(false);
        }
        let end = self
            .segments
            .get(self.next + 1)
            .map_or(self.limit, |&n| n.min(self.limit));
        let mut reader = SegmentReader::open(&self.dir, start, Some(HEADER_LEN + (end - start)))?;
        if self.after > start {
            // `after` is normally an LSN this log returned, hence a record boundary: start there
            // rather than reading the whole segment. If it is not, read from the start and skip.
            let at = HEADER_LEN + (self.after - start);
            reader.seek(at)?;
            let aligned = matches!(reader.step()?, Step::Record(_) | Step::End);
            reader.seek(if aligned { at } else { HEADER_LEN })?;
        }
        self.next += 1;
        self.current = Some(reader);
        Ok(true)
    }

    fn advance(&mut self) -> Result<Option<(Lsn, Batch)>, WalError> {
        loop {
            let Some(reader) = self.current.as_mut() else {
                if self.open_next()? {
                    continue;
                }
                return Ok(None);
            };
            let (start_lsn, end_lsn, decoded) = match reader.step()? {
                Step::End => {
                    self.current = None;
                    continue;
                }
                Step::Bad { offset, reason } => {
                    return Err(WalError::Corrupt {
                        path: reader.path().to_path_buf(),
                        offset,
                        detail: reason.to_string(),
                    })
                }
                Step::Record(frame) if frame.end_lsn <= self.after => continue,
                Step::Record(frame) => (
                    frame.start_lsn,
                    frame.end_lsn,
                    codec::decode_batch(frame.body),
                ),
            };
            return match decoded {
                Ok(batch) => Ok(Some((end_lsn, batch))),
                Err(e) => Err(WalError::Corrupt {
                    path: reader.path().to_path_buf(),
                    offset: reader.offset() - (end_lsn - start_lsn),
                    detail: format!("checksum is valid but the batch is not: {e}"),
                }),
            };
        }
    }
}

impl Iterator for WalReader {
    type Item = Result<(Lsn, Batch), WalError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.done {
            return None;
        }
        let item = self.advance().transpose();
        if !matches!(item, Some(Ok(_))) {
            self.done = true;
        }
        item
    }
}
