//! The event log: the embedded store's primary durable record.
//!
//! Every accepted event is one record in an append-only segment file under
//! `data/sluice.log/`, carrying everything the store knows of it at arrival:
//! its sequence number and id, the metadata, the dedup key and its deadline,
//! the headers kept for rules and the body. A batch of records goes out in one
//! `write` and one `fdatasync`, and intake answers 202 only after that. The
//! SQLite index is built from these records and can be rebuilt from them.
//!
//! A record is framed as `len: u32 LE | crc: u32 LE | payload`, where `crc` is
//! the CRC-32 of the payload. The payload layout is this project's own (a
//! format byte, fixed-width integers, length-prefixed strings, the body
//! last); it is written by hand because it is the on-disk format, and the
//! reader checks length, checksum and sequence number before handing a record
//! out, so a short, torn or overwritten record is an error that names the
//! file and offset, never wrong bytes.
//!
//! Segments roll over past [`SEGMENT_BYTES`] between batches and are never
//! rewritten, except for cutting a torn record off the tail of the newest
//! one at start (those bytes were never acknowledged; they are kept beside it).

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{BufReader, Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use bytes::Bytes;

use crate::event::{Event, IdOrigin, Provider};

/// Where a segment rolls over to the next, by default.
pub const SEGMENT_BYTES: u64 = 256 * 1024 * 1024;

/// Length and checksum before each record's payload.
const FRAME: usize = 8;

/// The payload layout this build writes and reads.
const FORMAT: u8 = 1;

/// The largest payload a frame may claim: above any body sluice accepts, so
/// a garbage length read from a torn tail is caught before allocating it.
const MAX_PAYLOAD: u32 = 1 << 30;

/// The directory of segments that belongs to an index file:
/// `data/sluice.db` → `data/sluice.log/`.
pub fn dir_for(db: &Path) -> PathBuf {
    db.with_extension("log")
}

/// The file of segment `n` in `dir`.
pub fn segment_path(dir: &Path, n: u32) -> PathBuf {
    dir.join(format!("{n:08}.seg"))
}

/// The segment numbers present in `dir`, oldest first.
pub fn segments(dir: &Path) -> std::io::Result<Vec<u32>> {
    let mut out: Vec<u32> = match std::fs::read_dir(dir) {
        Ok(entries) => entries
            .filter_map(|e| {
                e.ok()?
                    .file_name()
                    .to_str()?
                    .strip_suffix(".seg")?
                    .parse::<u32>()
                    .ok()
            })
            .collect(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => return Err(e),
    };
    out.sort_unstable();
    Ok(out)
}

/// A place in the log: a segment and a byte offset in it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub struct Position {
    /// Segment number.
    pub segment: u32,
    /// Byte offset in the segment.
    pub offset: u64,
}

/// Where one record lives (frame included).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecordRef {
    /// Segment number.
    pub segment: u32,
    /// Byte offset of the frame in the segment.
    pub offset: u64,
    /// Length of the frame and payload.
    pub len: u32,
}

impl RecordRef {
    /// The position just past this record.
    pub fn end(&self) -> Position {
        Position {
            segment: self.segment,
            offset: self.offset + u64::from(self.len),
        }
    }
}

/// One event as the log holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// The store's sequence number (the index's row key).
    pub seq: i64,
    /// The store's event id.
    pub id: String,
    /// The configured source.
    pub source: String,
    /// The provider behind it.
    pub provider: Provider,
    /// The event kind.
    pub kind: String,
    /// The action, if any.
    pub action: Option<String>,
    /// The provider's delivery id (or `sha256:` + the body hash).
    pub delivery_id: String,
    /// Whether the signature covered the delivery id.
    pub id_origin: IdOrigin,
    /// Hex SHA-256 of the body.
    pub body_sha256: String,
    /// An earlier event that came with the same unsigned id and another body.
    pub conflict_with: Option<String>,
    /// The dedup key ([`crate::event::dedup_key`]).
    pub dedup_key: String,
    /// Until when the key holds; `None`: for good.
    pub dedup_until_ms: Option<i64>,
    /// Arrival, in milliseconds since the Unix epoch.
    pub received_at_ms: i64,
    /// Headers kept for rules.
    pub headers: Vec<(String, String)>,
    /// The payload document.
    pub body: Bytes,
}

impl Record {
    /// Appends this record, framed, to `out`; returns the frame's length.
    pub fn frame_into(&self, out: &mut Vec<u8>) -> u32 {
        let start = out.len();
        out.extend_from_slice(&[0u8; FRAME]);
        out.push(FORMAT);
        out.extend_from_slice(&self.seq.to_le_bytes());
        out.extend_from_slice(&self.received_at_ms.to_le_bytes());
        put_opt_i64(out, self.dedup_until_ms);
        out.push(self.id_origin as u8);
        put_str(out, &self.id);
        put_str(out, &self.source);
        put_str(out, self.provider.as_str());
        put_str(out, &self.kind);
        put_opt_str(out, self.action.as_deref());
        put_str(out, &self.delivery_id);
        put_str(out, &self.body_sha256);
        put_opt_str(out, self.conflict_with.as_deref());
        put_str(out, &self.dedup_key);
        put_u32(out, self.headers.len());
        for (k, v) in &self.headers {
            put_str(out, k);
            put_str(out, v);
        }
        put_u32(out, self.body.len());
        out.extend_from_slice(&self.body);
        let payload_len = out.len() - start - FRAME;
        let crc = crc32fast::hash(&out[start + FRAME..]);
        out[start..start + 4].copy_from_slice(&(payload_len as u32).to_le_bytes());
        out[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
        (out.len() - start) as u32
    }

    /// Reads a payload whose checksum has been checked.
    fn decode(payload: &[u8]) -> Result<Record, String> {
        let mut r = Cursor(payload);
        let format = r.u8()?;
        if format != FORMAT {
            return Err(format!(
                "record format {format}; this build reads format {FORMAT}"
            ));
        }
        let seq = r.i64()?;
        let received_at_ms = r.i64()?;
        let dedup_until_ms = r.opt_i64()?;
        let id_origin = match r.u8()? {
            x if x == IdOrigin::Signed as u8 => IdOrigin::Signed,
            x if x == IdOrigin::Unsigned as u8 => IdOrigin::Unsigned,
            x if x == IdOrigin::Body as u8 => IdOrigin::Body,
            x => return Err(format!("unknown id origin {x}")),
        };
        let id = r.str()?;
        let source = r.str()?;
        let provider_name = r.str()?;
        let provider = Provider::parse(&provider_name)
            .ok_or_else(|| format!("unknown provider {provider_name:?}"))?;
        let kind = r.str()?;
        let action = r.opt_str()?;
        let delivery_id = r.str()?;
        let body_sha256 = r.str()?;
        let conflict_with = r.opt_str()?;
        let dedup_key = r.str()?;
        let n = r.u32()? as usize;
        let mut headers = Vec::with_capacity(n.min(256));
        for _ in 0..n {
            headers.push((r.str()?, r.str()?));
        }
        let body_len = r.u32()? as usize;
        let body = Bytes::copy_from_slice(r.take(body_len)?);
        if !r.0.is_empty() {
            return Err(format!("{} bytes after the body", r.0.len()));
        }
        Ok(Record {
            seq,
            id,
            source,
            provider,
            kind,
            action,
            delivery_id,
            id_origin,
            body_sha256,
            conflict_with,
            dedup_key,
            dedup_until_ms,
            received_at_ms,
            headers,
            body,
        })
    }

    /// The event the store hands out.
    pub fn into_event(self) -> Event {
        Event {
            id: self.id,
            source: self.source,
            provider: self.provider,
            kind: self.kind,
            action: self.action,
            delivery_id: self.delivery_id,
            received_at_ms: self.received_at_ms,
            headers: self.headers,
            body: self.body,
        }
    }
}

fn put_u32(out: &mut Vec<u8>, n: usize) {
    out.extend_from_slice(&u32::try_from(n).unwrap_or(u32::MAX).to_le_bytes());
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    put_u32(out, s.len());
    out.extend_from_slice(s.as_bytes());
}

fn put_opt_str(out: &mut Vec<u8>, s: Option<&str>) {
    match s {
        Some(s) => {
            out.push(1);
            put_str(out, s);
        }
        None => out.push(0),
    }
}

fn put_opt_i64(out: &mut Vec<u8>, n: Option<i64>) {
    match n {
        Some(n) => {
            out.push(1);
            out.extend_from_slice(&n.to_le_bytes());
        }
        None => out.push(0),
    }
}

struct Cursor<'a>(&'a [u8]);

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        if self.0.len() < n {
            return Err(format!(
                "field of {n} bytes runs past the record's end ({} left)",
                self.0.len()
            ));
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }
    fn u8(&mut self) -> Result<u8, String> {
        Ok(self.take(1)?[0])
    }
    fn u32(&mut self) -> Result<u32, String> {
        Ok(u32::from_le_bytes(
            self.take(4)?.try_into().expect("4 bytes"),
        ))
    }
    fn i64(&mut self) -> Result<i64, String> {
        Ok(i64::from_le_bytes(
            self.take(8)?.try_into().expect("8 bytes"),
        ))
    }
    fn opt_i64(&mut self) -> Result<Option<i64>, String> {
        Ok(match self.u8()? {
            0 => None,
            _ => Some(self.i64()?),
        })
    }
    fn str(&mut self) -> Result<String, String> {
        let n = self.u32()? as usize;
        String::from_utf8(self.take(n)?.to_vec()).map_err(|e| format!("string field: {e}"))
    }
    fn opt_str(&mut self) -> Result<Option<String>, String> {
        Ok(match self.u8()? {
            0 => None,
            _ => Some(self.str()?),
        })
    }
}

/// Why a record could not be read back.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LogError {
    /// The segment file is gone.
    #[error("{path}: segment missing ({why})")]
    Missing {
        /// The segment file.
        path: String,
        /// The I/O error.
        why: String,
    },
    /// The segment ends before the record does: it is shorter than the index claims.
    #[error(
        "{path}: the segment is {file_len} bytes, shorter than the record at {offset}+{len} the index points at"
    )]
    Short {
        /// The segment file.
        path: String,
        /// Record offset.
        offset: u64,
        /// Record length.
        len: u32,
        /// The file's length.
        file_len: u64,
    },
    /// The bytes there are not the record the index expects.
    #[error("{path}: the record at offset {offset} is damaged: {why}")]
    Damaged {
        /// The segment file.
        path: String,
        /// Record offset.
        offset: u64,
        /// What is wrong.
        why: String,
    },
    /// Any other I/O error.
    #[error("{path}: {why}")]
    Io {
        /// The segment file.
        path: String,
        /// The I/O error.
        why: String,
    },
}

/// Checks a frame read at `offset` and decodes its payload.
fn check_frame(path: &Path, offset: u64, frame: &[u8]) -> Result<Record, LogError> {
    let damaged = |why: String| LogError::Damaged {
        path: path.display().to_string(),
        offset,
        why,
    };
    if frame.len() < FRAME {
        return Err(damaged(format!(
            "{} bytes, shorter than a frame",
            frame.len()
        )));
    }
    let len = u32::from_le_bytes(frame[0..4].try_into().expect("4 bytes")) as usize;
    let crc = u32::from_le_bytes(frame[4..8].try_into().expect("4 bytes"));
    let payload = &frame[FRAME..];
    if payload.len() != len {
        return Err(damaged(format!(
            "the frame says {len} bytes, the index {}",
            payload.len()
        )));
    }
    if crc32fast::hash(payload) != crc {
        return Err(damaged("checksum mismatch".into()));
    }
    Record::decode(payload).map_err(damaged)
}

/// Reads records by where the index says they are; cheap to clone, keeps
/// one open handle per segment.
#[derive(Debug, Clone)]
pub struct LogReader {
    dir: PathBuf,
    open: Arc<Mutex<HashMap<u32, Arc<File>>>>,
}

impl LogReader {
    /// A reader over the segments in `dir`.
    pub fn new(dir: PathBuf) -> Self {
        LogReader {
            dir,
            open: Arc::default(),
        }
    }

    /// The directory of segments.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Forgets the open handle of a segment (it was removed).
    pub fn forget(&self, segment: u32) {
        self.open
            .lock()
            .expect("segment handles lock")
            .remove(&segment);
    }

    /// The record at `at`, which must be event `seq`.
    pub fn read(&self, at: RecordRef, seq: i64) -> Result<Record, LogError> {
        let path = segment_path(&self.dir, at.segment);
        let file = {
            let mut open = self.open.lock().expect("segment handles lock");
            match open.get(&at.segment) {
                Some(f) => f.clone(),
                None => {
                    let f = Arc::new(File::open(&path).map_err(|e| {
                        let (path, why) = (path.display().to_string(), e.to_string());
                        if e.kind() == std::io::ErrorKind::NotFound {
                            LogError::Missing { path, why }
                        } else {
                            LogError::Io { path, why }
                        }
                    })?);
                    open.insert(at.segment, f.clone());
                    f
                }
            }
        };
        let mut buf = vec![0u8; at.len as usize];
        if let Err(e) = file.read_exact_at(&mut buf, at.offset) {
            let file_len = file.metadata().map(|m| m.len()).unwrap_or(0);
            if file_len < at.offset + u64::from(at.len) {
                return Err(LogError::Short {
                    path: path.display().to_string(),
                    offset: at.offset,
                    len: at.len,
                    file_len,
                });
            }
            return Err(LogError::Io {
                path: path.display().to_string(),
                why: e.to_string(),
            });
        }
        let record = check_frame(&path, at.offset, &buf)?;
        if record.seq != seq {
            return Err(LogError::Damaged {
                path: path.display().to_string(),
                offset: at.offset,
                why: format!("holds event #{} where the index expects #{seq}", record.seq),
            });
        }
        Ok(record)
    }
}

/// How a scan of one segment ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ScanEnd {
    /// Every byte was a whole, valid record; the segment ends here.
    Clean(u64),
    /// From this offset on, the bytes are not a valid record (`why`).
    Invalid {
        /// Where the first bad record starts.
        at: u64,
        /// The segment's length.
        file_len: u64,
        /// What is wrong.
        why: String,
    },
}

/// Reads the records of segment `n` from `from` on, in order, handing each to
/// `each` (which may stop the scan by returning an error).
pub fn scan<E>(
    dir: &Path,
    n: u32,
    from: u64,
    mut each: impl FnMut(RecordRef, Record) -> Result<(), E>,
) -> Result<Result<ScanEnd, E>, std::io::Error> {
    let path = segment_path(dir, n);
    let file = File::open(&path)?;
    let file_len = file.metadata()?.len();
    let mut reader = BufReader::with_capacity(1 << 20, file);
    std::io::Seek::seek(&mut reader, std::io::SeekFrom::Start(from))?;
    let mut offset = from;
    let mut frame = Vec::new();
    let invalid = |at: u64, why: String| Ok(Ok(ScanEnd::Invalid { at, file_len, why }));
    while offset < file_len {
        if file_len - offset < FRAME as u64 {
            return invalid(offset, "a frame header cut short".into());
        }
        let mut head = [0u8; FRAME];
        reader.read_exact(&mut head)?;
        let len = u32::from_le_bytes(head[0..4].try_into().expect("4 bytes"));
        if len > MAX_PAYLOAD || u64::from(len) > file_len - offset - FRAME as u64 {
            return invalid(offset, format!("a record of {len} bytes cut short"));
        }
        frame.clear();
        frame.extend_from_slice(&head);
        frame.resize(FRAME + len as usize, 0);
        reader.read_exact(&mut frame[FRAME..])?;
        let record = match check_frame(&path, offset, &frame) {
            Ok(r) => r,
            Err(e) => return invalid(offset, e.to_string()),
        };
        let at = RecordRef {
            segment: n,
            offset,
            len: frame.len() as u32,
        };
        offset += frame.len() as u64;
        if let Err(e) = each(at, record) {
            return Ok(Err(e));
        }
    }
    Ok(Ok(ScanEnd::Clean(offset)))
}

/// The start of the first whole, valid record after `from` in segment `n`,
/// if there is one: where a scan that stopped at damaged bytes picks up, so
/// records written after the damage are not taken for a torn tail. Reads the
/// rest of the segment; used only when a scan found damage.
pub fn resync(dir: &Path, n: u32, from: u64) -> std::io::Result<Option<u64>> {
    let path = segment_path(dir, n);
    let mut file = File::open(&path)?;
    std::io::Seek::seek(&mut file, std::io::SeekFrom::Start(from))?;
    let mut rest = Vec::new();
    file.read_to_end(&mut rest)?;
    for p in 1..rest.len() {
        // A frame's payload starts with the format byte: a cheap first test
        // before the length and the checksum.
        if rest.get(p + FRAME) != Some(&FORMAT) {
            continue;
        }
        let len = u32::from_le_bytes(rest[p..p + 4].try_into().expect("4 bytes")) as usize;
        let Some(frame) = rest.get(p..p + FRAME + len) else {
            continue;
        };
        if len as u32 <= MAX_PAYLOAD && check_frame(&path, from + p as u64, frame).is_ok() {
            return Ok(Some(from + p as u64));
        }
    }
    Ok(None)
}

/// The writer's end: appends whole batches. Owned by the store's writer thread.
#[derive(Debug)]
pub struct LogWriter {
    dir: PathBuf,
    segment_bytes: u64,
    segment: u32,
    file: Arc<File>,
    len: u64,
    /// Held for the writer's life: two processes appending to one log would
    /// hand out overlapping offsets.
    _lock: Arc<File>,
}

impl LogWriter {
    /// Takes the log's lock (creating `dir` if needed) and opens its newest
    /// segment, appending after whatever it holds.
    /// `segment_bytes` is where a segment rolls over to the next.
    pub fn open(dir: &Path, segment_bytes: u64) -> std::io::Result<LogWriter> {
        if !dir.exists() {
            std::fs::create_dir_all(dir)?;
            if let Some(parent) = dir.parent() {
                File::open(parent)?.sync_all()?;
            }
        }
        let lock = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(dir.join("lock"))?;
        if let Err(e) = lock.try_lock() {
            return Err(std::io::Error::other(format!(
                "{} is in use by another sluice process ({e}); one data dir serves one process",
                dir.display()
            )));
        }
        let newest = segments(dir)?.last().copied().unwrap_or(1);
        LogWriter::open_segment(dir, segment_bytes, newest, Arc::new(lock))
    }

    fn open_segment(
        dir: &Path,
        segment_bytes: u64,
        segment: u32,
        lock: Arc<File>,
    ) -> std::io::Result<LogWriter> {
        let path = segment_path(dir, segment);
        let created = !path.exists();
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .read(true)
            .open(&path)?;
        if created {
            // The new name must survive a crash too.
            File::open(dir)?.sync_all()?;
        }
        let len = file.metadata()?.len();
        Ok(LogWriter {
            dir: dir.to_path_buf(),
            segment_bytes,
            segment,
            file: Arc::new(file),
            len,
            _lock: lock,
        })
    }

    /// The segment being written.
    pub fn segment(&self) -> u32 {
        self.segment
    }

    /// Where the next byte goes.
    pub fn position(&self) -> Position {
        Position {
            segment: self.segment,
            offset: self.len,
        }
    }

    /// Where a record of `len` bytes lands, given `pending` bytes already
    /// placed in this batch.
    pub fn place(&self, pending: u64, len: u32) -> RecordRef {
        RecordRef {
            segment: self.segment,
            offset: self.len + pending,
            len,
        }
    }

    /// Rolls over to a new segment if the current one is full. Call between batches.
    pub fn roll_if_full(&mut self) -> std::io::Result<()> {
        if self.len >= self.segment_bytes {
            // The index moves on to the next segment; what it holds of this
            // one must be durable first (the syncer may not have got to it).
            self.file.sync_data()?;
            *self = LogWriter::open_segment(
                &self.dir,
                self.segment_bytes,
                self.segment + 1,
                self._lock.clone(),
            )?;
        }
        Ok(())
    }

    /// Appends a batch of framed records in one write and makes them durable.
    pub fn append_durably(&mut self, batch: &[u8]) -> std::io::Result<()> {
        self.append(batch)?;
        self.file.sync_data()
    }

    /// Appends a batch of framed records in one write, not yet durable: a
    /// `sync_data` on [`LogWriter::file`] makes it so.
    pub fn append(&mut self, batch: &[u8]) -> std::io::Result<()> {
        if batch.is_empty() {
            return Ok(());
        }
        let result = (&*self.file).write_all(batch);
        match &result {
            Ok(()) => self.len += batch.len() as u64,
            // The file may hold part of the batch (a full disk): cut it back,
            // so the next batch does not land after bytes a scan would stop
            // at. If even that fails, go on after whatever is there; a scan
            // resynchronises on the next whole record.
            Err(_) => {
                if self.file.set_len(self.len).is_err() {
                    self.len = self.file.metadata().map(|m| m.len()).unwrap_or(self.len);
                }
            }
        }
        result
    }

    /// The segment being written, to sync it from another thread.
    pub fn file(&self) -> Arc<File> {
        self.file.clone()
    }

    /// Cuts the newest segment at `at`: the bytes past it are a torn record
    /// that was never acknowledged. They are first copied beside the segment
    /// (`NNNNNNNN.seg.torn-OFFSET`) for inspection, then the segment is
    /// truncated and synced. Returns the copy's path.
    pub fn cut_tail(&mut self, at: u64) -> std::io::Result<PathBuf> {
        let path = segment_path(&self.dir, self.segment);
        let aside = path.with_extension(format!("seg.torn-{at}"));
        let mut tail = Vec::new();
        let mut f = File::open(&path)?;
        std::io::Seek::seek(&mut f, std::io::SeekFrom::Start(at))?;
        f.read_to_end(&mut tail)?;
        let mut copy = File::create(&aside)?;
        copy.write_all(&tail)?;
        copy.sync_all()?;
        self.file.set_len(at)?;
        self.file.sync_all()?;
        File::open(&self.dir)?.sync_all()?;
        self.len = at;
        Ok(aside)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(seq: i64, body: &'static [u8]) -> Record {
        Record {
            seq,
            id: format!("evt_{seq}"),
            source: "gh".into(),
            provider: Provider::Github,
            kind: "issues".into(),
            action: Some("opened".into()),
            delivery_id: "d-1".into(),
            id_origin: IdOrigin::Unsigned,
            body_sha256: "ab".into(),
            conflict_with: None,
            dedup_key: "gh\0d-1".into(),
            dedup_until_ms: Some(7),
            received_at_ms: 1_700_000_000_000,
            headers: vec![("x-github-event".into(), "issues".into())],
            body: Bytes::from_static(body),
        }
    }

    #[test]
    fn a_record_reads_back_as_written_and_a_flipped_bit_is_caught() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = LogWriter::open(dir.path(), SEGMENT_BYTES).unwrap();
        let mut buf = Vec::new();
        let (a, b) = (record(1, b"{\"a\":1}"), record(2, b"{}"));
        let la = a.frame_into(&mut buf);
        let at_a = w.place(0, la);
        let lb = b.frame_into(&mut buf);
        let at_b = w.place(u64::from(la), lb);
        w.append_durably(&buf).unwrap();
        let r = LogReader::new(dir.path().to_path_buf());
        assert_eq!(r.read(at_a, 1).unwrap(), a);
        assert_eq!(r.read(at_b, 2).unwrap(), b);
        assert!(matches!(r.read(at_b, 3), Err(LogError::Damaged { .. })));

        let path = segment_path(dir.path(), 1);
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[at_b.offset as usize + FRAME + 3] ^= 1;
        std::fs::write(&path, &bytes).unwrap();
        let fresh = LogReader::new(dir.path().to_path_buf());
        let err = fresh.read(at_b, 2).unwrap_err().to_string();
        assert!(
            err.contains("checksum mismatch") && err.contains("00000001.seg"),
            "{err}"
        );
        let mut seen = Vec::new();
        let end = scan::<()>(dir.path(), 1, 0, |_, rec| {
            seen.push(rec.seq);
            Ok(())
        })
        .unwrap()
        .unwrap();
        assert_eq!(seen, vec![1]);
        assert!(matches!(end, ScanEnd::Invalid { at, .. } if at == at_b.offset));
    }
}
