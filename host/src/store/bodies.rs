//! The body log: event payloads in append-only segment files beside the
//! SQLite database, which keeps only each body's (segment, offset, length).
//!
//! Why not BLOBs in SQLite: a 12 KB body written into a WAL-mode database is
//! written twice (WAL, then checkpoint into the main file) and dominates the
//! cost of an append. Here a batch's bodies go out in one `write` and one
//! `fdatasync`, and the rows that point at them commit only after that, so a
//! committed row always points at durable bytes. Bytes written for a batch
//! whose commit never happened are unreferenced garbage at the tail, harmless.
//!
//! Segments are never rewritten; a new one starts past [`SEGMENT_BYTES`].
//! Retention (dropping whole old segments) is not implemented yet.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// Where a segment rolls over to the next.
pub const SEGMENT_BYTES: u64 = 256 * 1024 * 1024;

/// Where one body lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BodyRef {
    /// Segment number.
    pub segment: u32,
    /// Byte offset in the segment.
    pub offset: u64,
    /// Length in bytes.
    pub len: u32,
}

/// The directory of segments that belongs to a database file:
/// `data/sluice.db` → `data/sluice.bodies/`.
pub fn dir_for(db: &Path) -> PathBuf {
    db.with_extension("bodies")
}

fn segment_path(dir: &Path, n: u32) -> PathBuf {
    dir.join(format!("{n:08}.seg"))
}

/// Reads bodies; cheap to clone, keeps one open handle per segment.
#[derive(Debug, Clone)]
pub struct BodyReader {
    dir: PathBuf,
    open: Arc<Mutex<HashMap<u32, Arc<File>>>>,
}

impl BodyReader {
    /// A reader over the segments in `dir`.
    pub fn new(dir: PathBuf) -> Self {
        BodyReader {
            dir,
            open: Arc::default(),
        }
    }

    /// The bytes of one body.
    pub fn read(&self, r: BodyRef) -> std::io::Result<Vec<u8>> {
        let file = {
            let mut open = self.open.lock().expect("segment handles lock");
            match open.get(&r.segment) {
                Some(f) => f.clone(),
                None => {
                    let f = Arc::new(File::open(segment_path(&self.dir, r.segment))?);
                    open.insert(r.segment, f.clone());
                    f
                }
            }
        };
        let mut buf = vec![0u8; r.len as usize];
        file.read_exact_at(&mut buf, r.offset)?;
        Ok(buf)
    }
}

/// The writer's end: appends whole batches. Owned by the store's writer thread.
#[derive(Debug)]
pub struct BodyWriter {
    dir: PathBuf,
    segment: u32,
    file: File,
    len: u64,
    /// Held for the writer's life: two processes appending to one body log
    /// would hand out overlapping offsets.
    _lock: Arc<File>,
}

impl BodyWriter {
    /// Opens the newest segment in `dir` (creating `dir` and the first segment
    /// if needed) and appends after whatever it holds.
    pub fn open(dir: &Path) -> std::io::Result<BodyWriter> {
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
        let newest = std::fs::read_dir(dir)?
            .filter_map(|e| {
                e.ok()?
                    .file_name()
                    .to_str()?
                    .strip_suffix(".seg")?
                    .parse::<u32>()
                    .ok()
            })
            .max()
            .unwrap_or(1);
        BodyWriter::open_segment(dir, newest, Arc::new(lock))
    }

    fn open_segment(dir: &Path, segment: u32, lock: Arc<File>) -> std::io::Result<BodyWriter> {
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
        Ok(BodyWriter {
            dir: dir.to_path_buf(),
            segment,
            file,
            len,
            _lock: lock,
        })
    }

    /// Where the next body of `len` bytes will land, given `pending` bytes already
    /// placed in this batch; rolls to a new segment between batches only.
    pub fn place(&self, pending: u64, len: usize) -> BodyRef {
        BodyRef {
            segment: self.segment,
            offset: self.len + pending,
            len: len as u32,
        }
    }

    /// Rolls over to a new segment if the current one is full. Call between batches.
    pub fn roll_if_full(&mut self) -> std::io::Result<()> {
        if self.len >= SEGMENT_BYTES {
            *self = BodyWriter::open_segment(&self.dir, self.segment + 1, self._lock.clone())?;
        }
        Ok(())
    }

    /// Appends a batch's bodies in one write and makes them durable.
    pub fn append_durably(&mut self, batch: &[u8]) -> std::io::Result<()> {
        if batch.is_empty() {
            return Ok(());
        }
        let result = self
            .file
            .write_all(batch)
            .and_then(|_| self.file.sync_data());
        // On failure the file may hold part of the batch: re-read its true length
        // so later offsets stay right; the partial bytes are unreferenced.
        self.len = match &result {
            Ok(()) => self.len + batch.len() as u64,
            Err(_) => self.file.metadata().map(|m| m.len()).unwrap_or(self.len),
        };
        result
    }
}
