//! `sluice events export` and `sluice events import`: the store as JSON
//! lines ([`crate::store::export`]), for backups and for moving to another
//! store backend.
//!
//! Export reads the embedded store's file read-only, a page at a time, and
//! writes as it reads: memory stays flat whatever the store holds, and it
//! works while `serve` runs. Import reads a file a batch at a time and
//! stores each batch through [`Store::import_all`]; it opens the store for
//! writing, so the server must be stopped (one process per data dir).

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};

use super::ConfigArg;
use crate::store::export::{ExportedEvent, Header, Imported};
use crate::store::sqlite::{Options, SqliteStore};
use crate::store::{EventReader, Store};

/// Events read from the store per page.
const PAGE: usize = 256;

/// Most events, and most bytes of lines, handed to the store per import batch.
const BATCH: usize = 256;
const BATCH_BYTES: usize = 16 * 1024 * 1024;

/// `sluice events export`.
#[derive(Debug, clap::Args)]
pub struct ExportArgs {
    /// The config file.
    #[command(flatten)]
    pub config: ConfigArg,
    /// Write here instead of stdout. The file appears only once the export is
    /// complete (it is written as FILE.partial and renamed).
    #[arg(long, value_name = "FILE")]
    pub out: Option<PathBuf>,
    /// Only events received since then: a span back from now (`2h`,
    /// `7days`), milliseconds since the Unix epoch, or an RFC 3339 time.
    #[arg(long, value_name = "WHEN")]
    pub since: Option<String>,
}

/// `sluice events import`.
#[derive(Debug, clap::Args)]
pub struct ImportArgs {
    /// The config file; its store receives the events.
    #[command(flatten)]
    pub config: ConfigArg,
    /// The export file (`-` for stdin).
    pub file: PathBuf,
}

/// `--since`: milliseconds since the epoch, else what `whatif --since` takes.
fn parse_since(s: &str) -> anyhow::Result<i64> {
    match s.parse::<i64>() {
        Ok(ms) => Ok(ms),
        Err(_) => super::whatif::parse_since(s).map_err(|_| {
            anyhow::anyhow!(
                "--since {s:?}: expected a span (2h, 7days), milliseconds since the epoch, \
                 or an RFC 3339 time (2026-11-30T12:00:00Z)"
            )
        }),
    }
}

/// Runs `sluice events export`.
pub async fn export(args: ExportArgs) -> anyhow::Result<()> {
    let config = args.config.load()?;
    let since_ms = args.since.as_deref().map(parse_since).transpose()?;
    let db = super::events::db_path(&config)?;
    let store = SqliteStore::open_read_only(&db)?;
    let reader: &dyn EventReader = &store;
    match &args.out {
        None => {
            let stdout = std::io::stdout().lock();
            let (n, skipped) = write_export(reader, since_ms, std::io::BufWriter::new(stdout))
                .await
                .context("writing the export to stdout")?;
            report(n, skipped, "stdout");
        }
        Some(path) => {
            let partial = partial_path(path);
            let file = std::fs::File::create(&partial)
                .with_context(|| format!("cannot create {}", partial.display()))?;
            let written = write_export(reader, since_ms, std::io::BufWriter::new(file)).await;
            let (n, skipped) = match written {
                Ok(w) => w,
                Err(e) => {
                    let _ = std::fs::remove_file(&partial);
                    return Err(e.context(format!("writing {}", path.display())));
                }
            };
            std::fs::rename(&partial, path).with_context(|| {
                format!("cannot rename {} to {}", partial.display(), path.display())
            })?;
            report(n, skipped, &path.display().to_string());
        }
    }
    Ok(())
}

fn partial_path(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(".partial");
    PathBuf::from(name)
}

fn report(n: u64, skipped: u64, to: &str) {
    if skipped > 0 {
        eprintln!("exported {n} events to {to}; {skipped} could not be read and were left out");
    } else {
        eprintln!("exported {n} events to {to}");
    }
}

/// Writes the header and every event, page by page, synced to disk at the
/// end; returns how many events were written and how many left out.
async fn write_export<W: Write + AsFile>(
    reader: &dyn EventReader,
    since_ms: Option<i64>,
    mut out: std::io::BufWriter<W>,
) -> anyhow::Result<(u64, u64)> {
    serde_json::to_writer(&mut out, &Header::new(since_ms))?;
    out.write_all(b"\n")?;
    let (mut written, mut skipped) = (0u64, 0u64);
    let mut after: Option<String> = None;
    loop {
        let page = reader
            .export_page(since_ms, after.as_deref(), PAGE)
            .await
            .context("reading the store")?;
        for (id, why) in &page.skipped {
            eprintln!("warning: event {id} left out of the export: {why}");
        }
        skipped += page.skipped.len() as u64;
        for event in &page.events {
            serde_json::to_writer(&mut out, event)?;
            out.write_all(b"\n")?;
            written += 1;
        }
        match page.next {
            Some(next) => after = Some(next),
            None => break,
        }
    }
    out.flush()?;
    let inner = out.into_inner().map_err(|e| e.into_error())?;
    inner.sync()?;
    Ok((written, skipped))
}

/// Where an export goes: a file is synced before it is renamed into place.
trait AsFile {
    fn sync(&self) -> std::io::Result<()>;
}

impl AsFile for std::fs::File {
    fn sync(&self) -> std::io::Result<()> {
        self.sync_all()
    }
}

impl AsFile for std::io::StdoutLock<'_> {
    fn sync(&self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Runs `sluice events import`.
pub async fn import(args: ImportArgs) -> anyhow::Result<()> {
    let config = args.config.load()?;
    let name = args.file.display().to_string();
    let input: Box<dyn BufRead> = if name == "-" {
        Box::new(BufReader::new(std::io::stdin()))
    } else {
        Box::new(BufReader::new(
            std::fs::File::open(&args.file).with_context(|| format!("cannot open {name}"))?,
        ))
    };
    if config.store.backend == crate::config::Backend::Nats {
        let options = crate::store::nats::NatsOptions::from_config(&config);
        let store = crate::store::nats::NatsStore::open(options)
            .await
            .map_err(|e| anyhow::anyhow!("{}: [store.nats]: {e}", config.origin))?;
        let result = import_lines(&store, input, &name).await;
        crate::store::Store::close(&store).await;
        let counts = result?;
        println!(
            "imported {} events into the NATS cluster at {}; {} already held, skipped",
            counts.added, config.store.nats.url, counts.held
        );
        return Ok(());
    }
    let db = config.data_dir().join(&config.store.path);
    let store = SqliteStore::open_with(&db, Options::from_config(&config.store, &config.rules))
        .map_err(|e| {
            let e = e.to_string();
            if e.contains("in use by another sluice process") {
                anyhow::anyhow!(
                    "{}: the store is in use ({e}); stop `sluice serve` on this data dir \
                     before importing (import writes to the store, which serves one process)",
                    db.display()
                )
            } else {
                anyhow::anyhow!("{}: {e}", db.display())
            }
        })?;
    let result = import_lines(&store, input, &name).await;
    // Everything answered is durable; this stops the writer cleanly.
    store.close();
    let counts = result?;
    println!(
        "imported {} events into {}; {} already held, skipped",
        counts.added,
        db.display(),
        counts.held
    );
    Ok(())
}

#[derive(Debug, Default)]
struct Counts {
    added: u64,
    held: u64,
}

/// Reads the header and every event line of `input` (named `name`) and
/// imports them a batch at a time.
async fn import_lines(
    store: &dyn Store,
    input: Box<dyn BufRead>,
    name: &str,
) -> anyhow::Result<Counts> {
    let mut counts = Counts::default();
    let mut batch = Batch::default();
    let mut batch_bytes = 0usize;
    let mut header = false;
    for (i, line) in input.lines().enumerate() {
        let n = i + 1;
        let line = line.with_context(|| format!("{name}:{n}: cannot read the line"))?;
        if !header {
            Header::parse(&line).map_err(|e| anyhow::anyhow!("{name}: line {n}: {e}"))?;
            header = true;
            continue;
        }
        if line.trim().is_empty() {
            continue;
        }
        let event: ExportedEvent = match serde_json::from_str(&line) {
            Ok(ev) => ev,
            Err(e) => {
                flush(store, &mut batch, &mut counts, name).await?;
                bail!(
                    "{name}: line {n}: not an exported event: {e} ({} events before it \
                     imported, {} already held; importing again skips them)",
                    counts.added,
                    counts.held
                );
            }
        };
        batch_bytes += line.len();
        batch.events.push(event);
        batch.lines.push(n);
        if batch.events.len() >= BATCH || batch_bytes >= BATCH_BYTES {
            flush(store, &mut batch, &mut counts, name).await?;
            batch_bytes = 0;
        }
    }
    if !header {
        bail!("{name}: line 1: empty file, not a sluice export");
    }
    flush(store, &mut batch, &mut counts, name).await?;
    Ok(counts)
}

/// Events read and not imported yet, with their line numbers.
#[derive(Debug, Default)]
struct Batch {
    events: Vec<ExportedEvent>,
    lines: Vec<usize>,
}

/// Imports a batch; the first event the store refused is an error naming
/// its line.
async fn flush(
    store: &dyn Store,
    batch: &mut Batch,
    counts: &mut Counts,
    name: &str,
) -> anyhow::Result<()> {
    if batch.events.is_empty() {
        return Ok(());
    }
    let first = batch.lines[0];
    let results = store
        .import_all(&batch.events)
        .await
        .with_context(|| format!("{name}: line {first} on: the store took none of them"))?;
    let mut failed = None;
    for ((n, event), result) in batch.lines.iter().zip(&batch.events).zip(results) {
        match result {
            Ok(Imported::Added) => counts.added += 1,
            Ok(Imported::AlreadyHeld(_)) => counts.held += 1,
            Err(e) if failed.is_none() => {
                failed = Some(format!("{name}: line {n}: event {}: {e}", event.id))
            }
            Err(_) => {}
        }
    }
    batch.events.clear();
    batch.lines.clear();
    if let Some(f) = failed {
        bail!(
            "{f} ({} events imported, {} already held; importing again skips them)",
            counts.added,
            counts.held
        );
    }
    Ok(())
}
