//! Segment files and record frames: naming, creating, reading, and checking them at start-up.
//!
//! A segment is `<first LSN, 20 digits>.wal`: a 16-byte header (`magic "FTWAL001" | first LSN u64`)
//! followed by records. Record `k` of a segment starting at LSN `s` lives at file offset
//! `HEADER_LEN + (its start LSN - s)`: LSNs count record bytes only, never headers.
//!
//! A record is a frame `len u32 | crc32 u32 | payload` (little-endian; the CRC covers the payload),
//! payload = `kind u8 (1 = batch) | synced_lag varint | batch body (see codec)`. `synced_lag` is how
//! far behind the record's start the log had been fsynced when the record was written. It tells a
//! torn tail from damage: after a crash, a bad record at LSN `x` followed by an intact record that
//! says "everything before `y > x` was on disk when I was written" proves `x` had been synced, so it
//! was damaged later and dropping it would lose acknowledged data. Without such a witness, the bad
//! bytes may be a write the crash interrupted, and are truncated.
//!
//! Zero bytes after the last record are space the writer wrote ahead and had not used yet (a
//! record never starts with a zero length), not damage: start-up keeps them.
//!
//! New segments are written to `*.wal.tmp`, fsynced and renamed, so a segment file always has a
//! whole header. A non-last segment was fsynced (and its zeros cut off) before its successor was
//! created, so it must be intact to its last record and end exactly where the next one starts.

use super::codec::{self, varint_len, BATCH_HEADER_LEN};
use super::{Lsn, WalError};
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufReader, Read, Seek, SeekFrom, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

const MAGIC: [u8; 8] = *b"FTWAL001";
/// Bytes before the first record of a segment.
pub const HEADER_LEN: u64 = 16;
/// `len u32 | crc32 u32`.
pub const FRAME_HEAD_LEN: u64 = 8;
const KIND_BATCH: u8 = 1;
/// Largest accepted payload. Records are one request's positions (at most about 100 KiB at 1,000
/// positions), so anything near this is garbage read as a length.
pub const MAX_PAYLOAD: usize = 16 << 20;
const MIN_PAYLOAD: usize = 1 + 1 + BATCH_HEADER_LEN;
const SUFFIX: &str = ".wal";
const TMP_SUFFIX: &str = ".wal.tmp";

pub fn file_name(start: Lsn) -> String {
    format!("{start:020}{SUFFIX}")
}

pub fn path(dir: &Path, start: Lsn) -> PathBuf {
    dir.join(file_name(start))
}

fn start_of(name: &str) -> Option<Lsn> {
    let digits = name.strip_suffix(SUFFIX)?;
    if digits.len() != 20 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

pub fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> WalError + 'a {
    move |source| WalError::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

fn corrupt(path: &Path, offset: u64, detail: impl Into<String>) -> WalError {
    WalError::Corrupt {
        path: path.to_path_buf(),
        offset,
        detail: detail.into(),
    }
}

/// Start LSNs of the segments in `dir`, ascending. Deletes leftover temporary files of a segment
/// creation that a crash interrupted (they were never renamed, so never held a record).
pub fn list(dir: &Path) -> Result<Vec<Lsn>, WalError> {
    let mut starts = Vec::new();
    for entry in fs::read_dir(dir).map_err(io_err("list", dir))? {
        let entry = entry.map_err(io_err("list", dir))?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if name.ends_with(TMP_SUFFIX) {
            let tmp = entry.path();
            fs::remove_file(&tmp).map_err(io_err("remove", &tmp))?;
        } else if let Some(start) = start_of(name) {
            starts.push(start);
        }
    }
    starts.sort_unstable();
    Ok(starts)
}

pub fn sync_dir(dir: &Path) -> Result<(), WalError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err("fsync directory", dir))
}

/// Creates the segment starting at `start` (header only, durable, directory entry included) and
/// returns it open for appending.
pub fn create(dir: &Path, start: Lsn) -> Result<File, WalError> {
    let tmp = dir.join(format!("{start:020}{TMP_SUFFIX}"));
    let mut file = File::create(&tmp).map_err(io_err("create", &tmp))?;
    let mut header = [0u8; HEADER_LEN as usize];
    header[..8].copy_from_slice(&MAGIC);
    header[8..].copy_from_slice(&start.to_le_bytes());
    file.write_all(&header).map_err(io_err("write", &tmp))?;
    file.sync_all().map_err(io_err("fsync", &tmp))?;
    let path = path(dir, start);
    fs::rename(&tmp, &path).map_err(io_err("rename", &tmp))?;
    sync_dir(dir)?;
    Ok(file)
}

/// Opens an existing segment for writing (at offsets the caller knows); returns it and its length.
pub fn open_write(path: &Path) -> Result<(File, u64), WalError> {
    let file = OpenOptions::new()
        .write(true)
        .open(path)
        .map_err(io_err("open", path))?;
    let len = file.metadata().map_err(io_err("stat", path))?.len();
    Ok((file, len))
}

/// Whether everything from `offset` to the end of the file is zero bytes: space the writer
/// pre-allocated and had not used yet (see [`super::writer`]).
fn zeros_from(path: &Path, offset: u64) -> Result<bool, WalError> {
    let mut file = File::open(path).map_err(io_err("open", path))?;
    file.seek(SeekFrom::Start(offset))
        .map_err(io_err("seek", path))?;
    let mut chunk = vec![0u8; 256 << 10];
    loop {
        let n = match file.read(&mut chunk) {
            Ok(0) => return Ok(true),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(io_err("read", path)(e)),
        };
        if chunk[..n].iter().any(|&b| b != 0) {
            return Ok(false);
        }
    }
}

/// Bytes a record with this lag and body takes in the log.
pub fn frame_len(synced_lag: u64, body_len: usize) -> u64 {
    FRAME_HEAD_LEN + (1 + varint_len(synced_lag) + body_len) as u64
}

/// Largest batch body that fits in a record.
pub fn max_body_len() -> usize {
    MAX_PAYLOAD - 1 - varint_len(u64::MAX)
}

/// Appends a framed record to `buf`; the body must be at most [`max_body_len`] bytes.
pub fn push_frame(buf: &mut Vec<u8>, synced_lag: u64, body: &[u8]) {
    let start = buf.len();
    buf.extend_from_slice(&[0; FRAME_HEAD_LEN as usize]);
    buf.push(KIND_BATCH);
    codec::put_varint(buf, synced_lag);
    buf.extend_from_slice(body);
    let payload = &buf[start + FRAME_HEAD_LEN as usize..];
    let len = payload.len() as u32;
    let crc = crc32fast::hash(payload);
    buf[start..start + 4].copy_from_slice(&len.to_le_bytes());
    buf[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
}

/// Splits a frame head into (payload length, CRC); `None` for an impossible length.
fn parse_head(head: [u8; 8]) -> Option<(usize, u32)> {
    let len = u32::from_le_bytes([head[0], head[1], head[2], head[3]]) as usize;
    let crc = u32::from_le_bytes([head[4], head[5], head[6], head[7]]);
    (MIN_PAYLOAD..=MAX_PAYLOAD)
        .contains(&len)
        .then_some((len, crc))
}

/// Checks a payload against its CRC and kind; returns (synced lag, body).
fn open_payload(payload: &[u8], crc: u32) -> Result<(u64, &[u8]), &'static str> {
    if crc32fast::hash(payload) != crc {
        return Err("checksum mismatch");
    }
    let Some((&kind, mut rest)) = payload.split_first() else {
        return Err("empty payload");
    };
    if kind != KIND_BATCH {
        return Err("unknown record kind");
    }
    let lag = codec::get_varint(&mut rest).map_err(|_| "malformed record header")?;
    Ok((lag, rest))
}

/// One record as read from a segment.
pub struct Frame<'a> {
    pub start_lsn: Lsn,
    pub end_lsn: Lsn,
    pub body: &'a [u8],
}

/// What reading the next frame found.
pub enum Step<'a> {
    Record(Frame<'a>),
    /// The reader reached its end offset exactly.
    End,
    /// The bytes at `offset` are not a valid record.
    Bad {
        offset: u64,
        reason: &'static str,
    },
}

/// Reads one segment's frames in order, up to an end offset.
pub struct SegmentReader {
    path: PathBuf,
    start: Lsn,
    file: BufReader<Bounded>,
    offset: u64,
    end: u64,
    payload: Vec<u8>,
}

/// A segment file read no further than an end offset. The bytes past it are not the reader's
/// (records not yet acknowledged, zeros written ahead), and reading them would put pages in the
/// cache that the next direct write has to invalidate first — waiting, inside its submit on the
/// request worker, for any that are still being read in (measured: 3–5 ms, five times a second,
/// with the history follower reading 256 KiB at a time and the kernel's read-ahead past that).
/// So a reader of a file that goes on past its end also asks the kernel for no read-ahead.
struct Bounded {
    file: File,
    pos: u64,
    end: u64,
}

impl Read for Bounded {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let left = self.end.saturating_sub(self.pos);
        let len = buf.len().min(usize::try_from(left).unwrap_or(usize::MAX));
        if len == 0 {
            return Ok(0);
        }
        let n = self.file.read_at(&mut buf[..len], self.pos)?;
        self.pos += n as u64;
        Ok(n)
    }
}

impl Seek for Bounded {
    fn seek(&mut self, to: SeekFrom) -> io::Result<u64> {
        let moved = match to {
            SeekFrom::Start(at) => Some(at),
            SeekFrom::Current(by) => self.pos.checked_add_signed(by),
            SeekFrom::End(by) => self.end.checked_add_signed(by),
        };
        self.pos = moved.ok_or_else(|| io::Error::other("seek before the start of the file"))?;
        Ok(self.pos)
    }
}

impl SegmentReader {
    /// Opens the segment starting at `start` and checks its header. It is read up to file offset
    /// `end`, or to the end of the file when `None`.
    pub fn open(dir: &Path, start: Lsn, end: Option<u64>) -> Result<SegmentReader, WalError> {
        let path = path(dir, start);
        let file = File::open(&path).map_err(io_err("open", &path))?;
        let file_len = file.metadata().map_err(io_err("stat", &path))?.len();
        let end = end.unwrap_or(file_len);
        if end < file_len {
            // The file goes on past what is read: the active segment, whose tail direct writes
            // rewrite. Sealed segments end where their records do and keep their read-ahead.
            // SAFETY: advice on an open descriptor; no memory is passed.
            unsafe { libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_RANDOM) };
        }
        let bounded = Bounded { file, pos: 0, end };
        let mut file = BufReader::with_capacity(256 << 10, bounded);
        let mut header = [0u8; HEADER_LEN as usize];
        match file.read_exact(&mut header) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                return Err(corrupt(&path, 0, "segment header is missing or short"))
            }
            Err(e) => return Err(io_err("read", &path)(e)),
        }
        if header[..8] != MAGIC {
            return Err(corrupt(&path, 0, "not a log segment (bad magic)"));
        }
        let named = u64::from_le_bytes(header[8..].try_into().unwrap_or_default());
        if named != start {
            let detail = format!("header says the segment starts at LSN {named}, its name {start}");
            return Err(corrupt(&path, 8, detail));
        }
        Ok(SegmentReader {
            path,
            start,
            file,
            offset: HEADER_LEN,
            end,
            payload: Vec::new(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The file offset of the next frame (after the last good one).
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// Moves to file offset `to`, which must be a record boundary the caller knows of.
    pub fn seek(&mut self, to: u64) -> Result<(), WalError> {
        self.file
            .seek(SeekFrom::Start(to))
            .map_err(io_err("seek", &self.path))?;
        self.offset = to;
        Ok(())
    }

    /// Reads the next frame. I/O errors are errors; bad bytes are a [`Step::Bad`] for the caller to
    /// judge (a torn tail, or corruption).
    pub fn step(&mut self) -> Result<Step<'_>, WalError> {
        let at = self.offset;
        let left = self.end.saturating_sub(at);
        if left == 0 {
            return Ok(Step::End);
        }
        let bad = |reason| Ok(Step::Bad { offset: at, reason });
        if left < FRAME_HEAD_LEN {
            return bad("truncated record header");
        }
        let mut head = [0u8; FRAME_HEAD_LEN as usize];
        if !self.read(&mut head)? {
            return bad("truncated record header");
        }
        let Some((len, crc)) = parse_head(head) else {
            return bad("impossible record length");
        };
        let frame_len = FRAME_HEAD_LEN + len as u64;
        if frame_len > left {
            return bad("record runs past the end of the segment");
        }
        let mut payload = std::mem::take(&mut self.payload);
        payload.resize(len, 0);
        let complete = self.read(&mut payload)?;
        self.payload = payload;
        if !complete {
            return bad("record runs past the end of the file");
        }
        let body = match open_payload(&self.payload, crc) {
            Ok((_, body)) => body,
            Err(reason) => return bad(reason),
        };
        self.offset = at + frame_len;
        let start_lsn = self.start + (at - HEADER_LEN);
        Ok(Step::Record(Frame {
            start_lsn,
            end_lsn: start_lsn + frame_len,
            body,
        }))
    }

    /// Fills `buf`; false when the file ends first.
    fn read(&mut self, buf: &mut [u8]) -> Result<bool, WalError> {
        match self.file.read_exact(buf) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Ok(false),
            Err(e) => Err(io_err("read", &self.path)(e)),
        }
    }
}

/// What start-up found on disk.
pub struct Recovered {
    /// Start LSNs, ascending; the last is the active segment.
    pub segments: Vec<Lsn>,
    /// End of the last record.
    pub end: Lsn,
    /// Bytes of the segment files, pre-allocated space included.
    pub disk_bytes: u64,
}

/// Validates every segment in `dir` (creating the first if there is none), truncates a torn tail of
/// the last one, and fsyncs it so that everything it holds is on disk before new records say so.
pub fn recover(dir: &Path) -> Result<Recovered, WalError> {
    fs::create_dir_all(dir).map_err(io_err("create directory", dir))?;
    let segments = list(dir)?;
    let Some(&last) = segments.last() else {
        create(dir, 0)?;
        return Ok(Recovered {
            segments: vec![0],
            end: 0,
            disk_bytes: HEADER_LEN,
        });
    };
    let mut expected = None;
    let mut disk_bytes = 0;
    for &start in &segments {
        if let Some(expected) = expected.filter(|&e| e != start) {
            let detail = format!(
                "the previous segment ends at LSN {expected} but this one starts at {start}: \
                 a segment is missing or was cut short"
            );
            return Err(corrupt(&path(dir, start), 0, detail));
        }
        let (good_end, file_len) = scan(dir, start, start == last)?;
        expected = Some(start + (good_end - HEADER_LEN));
        disk_bytes += file_len;
    }
    let last_path = path(dir, last);
    File::open(&last_path)
        .and_then(|f| f.sync_data())
        .map_err(io_err("fsync", &last_path))?;
    Ok(Recovered {
        segments,
        end: expected.unwrap_or(last),
        disk_bytes,
    })
}

/// Reads a segment's records to the end; returns the file offset after its last good record and
/// the file's length. Zeros after the last record are pre-allocated space, kept. Other bad bytes
/// are an error, except at the tail of the last segment, which is truncated.
fn scan(dir: &Path, start: Lsn, is_last: bool) -> Result<(u64, u64), WalError> {
    let mut reader = SegmentReader::open(dir, start, None)?;
    let (offset, reason) = loop {
        match reader.step()? {
            Step::Record(_) => {}
            Step::End => return Ok((reader.offset(), reader.offset())),
            Step::Bad { offset, reason } => break (offset, reason),
        }
    };
    let path = reader.path().to_path_buf();
    if zeros_from(&path, offset)? {
        let len = fs::metadata(&path).map_err(io_err("stat", &path))?.len();
        return Ok((offset, len));
    }
    if !is_last {
        let detail = format!("{reason} (not the last segment, so not a torn write)");
        return Err(corrupt(&path, offset, detail));
    }
    truncate_torn_tail(&path, start, offset, reason)?;
    Ok((offset, offset))
}

/// Handles bad bytes at `offset` of the last segment: damage if a later record proves the bad one
/// had been synced, else a write the crash interrupted, cut off with a warning.
fn truncate_torn_tail(path: &Path, start: Lsn, offset: u64, reason: &str) -> Result<(), WalError> {
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(io_err("open", path))?;
    file.seek(SeekFrom::Start(offset))
        .map_err(io_err("seek", path))?;
    let mut tail = Vec::new();
    file.read_to_end(&mut tail).map_err(io_err("read", path))?;
    let bad_lsn = start + (offset - HEADER_LEN);
    if let Some((at, synced)) = find_witness(&tail, bad_lsn) {
        let detail = format!(
            "{reason}; the intact record at offset {} was written after the log had been synced \
             up to LSN {synced}, past this record (LSN {bad_lsn}), so this is damage, not a torn \
             write. Refusing to drop acknowledged data: move the file away, or truncate it to \
             {offset} bytes to accept the loss",
            offset + at as u64
        );
        return Err(corrupt(path, offset, detail));
    }
    file.set_len(offset).map_err(io_err("truncate", path))?;
    file.sync_data().map_err(io_err("fsync", path))?;
    tracing::warn!(
        file = %path.display(),
        offset,
        dropped_bytes = tail.len(),
        reason,
        "write-ahead log: torn tail truncated (a write interrupted by a crash)"
    );
    Ok(())
}

/// Looks for an intact record in `tail` (bytes from the bad record at `bad_lsn` on) that was
/// written after the log had been synced past `bad_lsn`; returns its index in `tail` and the synced
/// LSN it records. Scans every byte offset, since the bad record's length cannot be trusted.
pub fn find_witness(tail: &[u8], bad_lsn: Lsn) -> Option<(usize, Lsn)> {
    let mut i = 1;
    while i + FRAME_HEAD_LEN as usize <= tail.len() {
        let Some((frame_len, lag)) = frame_at(&tail[i..]) else {
            i += 1;
            continue;
        };
        let synced = bad_lsn.saturating_add(i as u64).checked_sub(lag);
        if synced.is_some_and(|s| s > bad_lsn) {
            return synced.map(|s| (i, s));
        }
        i += frame_len;
    }
    None
}

/// An intact frame at the start of `bytes`: (frame length, synced lag). The structure is checked
/// before the CRC: on garbage it fails within a few bytes, where a CRC would read up to the length
/// the garbage claims, making a search of every offset quadratic.
fn frame_at(bytes: &[u8]) -> Option<(usize, u64)> {
    let head: [u8; 8] = bytes.get(..FRAME_HEAD_LEN as usize)?.try_into().ok()?;
    let (len, crc) = parse_head(head)?;
    let payload = bytes.get(FRAME_HEAD_LEN as usize..FRAME_HEAD_LEN as usize + len)?;
    let (&kind, mut rest) = payload.split_first()?;
    let lag = codec::get_varint(&mut rest).ok()?;
    if kind != KIND_BATCH || codec::check_batch(rest).is_err() {
        return None;
    }
    (crc32fast::hash(payload) == crc).then_some((FRAME_HEAD_LEN as usize + len, lag))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wal::Batch;
    use proptest::prelude::*;

    fn body(received_at: i64) -> Vec<u8> {
        let mut out = Vec::new();
        codec::encode_batch(
            &Batch {
                received_at,
                positions: Vec::new(),
            },
            &mut out,
        );
        out
    }

    #[test]
    fn names_are_twenty_digits() {
        assert_eq!(file_name(42), "00000000000000000042.wal");
        assert_eq!(start_of(&file_name(u64::MAX)), Some(u64::MAX));
        assert_eq!(start_of("42.wal"), None);
        assert_eq!(start_of("0000000000000000004x.wal"), None);
        assert_eq!(start_of(&format!("{:020}.wal.tmp", 1)), None);
    }

    #[test]
    fn frames_are_self_describing() {
        let mut buf = Vec::new();
        push_frame(&mut buf, 300, &body(9));
        assert_eq!(buf.len() as u64, frame_len(300, body(9).len()));
        assert_eq!(frame_at(&buf), Some((buf.len(), 300)));
        buf[10] ^= 1;
        assert_eq!(frame_at(&buf), None);
    }

    #[test]
    fn a_witness_must_have_been_written_after_a_sync_past_the_bad_record() {
        // Layout from LSN 1000: [garbage 20 bytes][record A, lag L].
        let mut tail = vec![0xAB; 20];
        let at = tail.len();
        // A starts at LSN 1020. Lag 20 -> synced up to 1000: not past the bad record at 1000.
        push_frame(&mut tail, 20, &body(1));
        assert_eq!(find_witness(&tail, 1000), None);
        // Lag 10 -> synced up to 1010 > 1000: the bad record had been synced.
        let mut tail = vec![0xAB; 20];
        push_frame(&mut tail, 10, &body(1));
        assert_eq!(find_witness(&tail, 1000), Some((at, 1010)));
    }

    proptest! {
        #[test]
        fn witness_search_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
            let _ = find_witness(&bytes, 0);
            let _ = find_witness(&bytes, u64::MAX - 4096);
        }
    }

    #[test]
    fn a_bounded_reader_stops_at_its_end_offset() {
        use std::io::{Read, Seek, SeekFrom};
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, (0..100u8).collect::<Vec<u8>>()).unwrap();
        let file = std::fs::File::open(&path).unwrap();
        let mut bounded = Bounded {
            file,
            pos: 0,
            end: 40,
        };
        let mut all = Vec::new();
        bounded.read_to_end(&mut all).unwrap();
        assert_eq!(all, (0..40u8).collect::<Vec<u8>>());
        assert_eq!(bounded.seek(SeekFrom::Current(-5)).unwrap(), 35);
        assert_eq!(bounded.seek(SeekFrom::End(-10)).unwrap(), 30);
        let mut two = [0u8; 2];
        bounded.read_exact(&mut two).unwrap();
        assert_eq!(two, [30, 31]);
        assert!(bounded.seek(SeekFrom::Current(-100)).is_err());
        assert_eq!(bounded.seek(SeekFrom::Start(90)).unwrap(), 90);
        assert_eq!(
            bounded.read(&mut two).unwrap(),
            0,
            "past the end reads nothing"
        );
    }
}
