//! The chunking sink: cuts the event stream into `chunk-N.cast` files of event lines, the way
//! the daemon spools and uploads them. The header is kept apart (`header.json`); the whole
//! cast is the header followed by the chunks in index order.
//!
//! A chunk is written as `chunk-N.cast.part` and, once closed, fsynced and renamed to
//! `chunk-N.cast` (then the directory is fsynced): a `chunk-N.cast` file is always complete and
//! durable, so whoever watches the directory can upload it as it stands. A write that fails
//! (disk full) closes the open chunk with the whole lines that reached the disk, so no torn
//! line and no `.part` is left behind.

use super::event::Event;
use super::file::FileSink;
use super::sink::Sink;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;
use ztna_common::asciicast::Header;

/// The header line's file in a chunk directory.
pub const CHUNK_HEADER_FILE: &str = "header.json";

/// When a chunk is closed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkLimits {
    /// A chunk never grows past this many bytes (as a [`ChunkSink`], the session cuts longer
    /// output into events that fit; a line that is still longer, one character in a tiny
    /// limit, makes a chunk of its own). Contract key `chunk_max_bytes`.
    pub max_bytes: u64,
    /// A chunk is closed this long after its first event (session time), whether or not more
    /// events come. Contract key `chunk_max_secs`.
    pub max_age: Duration,
}

impl Default for ChunkLimits {
    fn default() -> Self {
        ChunkLimits {
            max_bytes: 1_048_576,
            max_age: Duration::from_secs(10),
        }
    }
}

/// A chunk that has been closed: complete, fsynced, under its final name.
#[derive(Debug, Clone, PartialEq)]
pub struct ClosedChunk {
    pub index: u64,
    pub path: PathBuf,
    pub bytes: u64,
    pub events: u64,
    /// Session time of its first and last event.
    pub first_time: Duration,
    pub last_time: Duration,
}

struct Open {
    index: u64,
    /// Whole lines only: a write that fails is cut back to the last whole line it took.
    out: FileSink,
    bytes: u64,
    events: u64,
    first_time: Duration,
    last_time: Duration,
}

type OnClose = Box<dyn FnMut(&ClosedChunk) + Send>;

/// Writes event lines into numbered chunk files. Usable on its own (the daemon feeds it lines
/// it received) or as a [`Sink`] via [`ChunkSink`].
pub struct ChunkWriter {
    dir: PathBuf,
    limits: ChunkLimits,
    next_index: u64,
    open: Option<Open>,
    on_close: Option<OnClose>,
    closed: u64,
}

impl ChunkWriter {
    /// Chunks go into `dir` (created if missing), numbered from 0.
    pub fn new(dir: impl Into<PathBuf>, limits: ChunkLimits) -> io::Result<Self> {
        let dir = dir.into();
        fs::create_dir_all(&dir)?;
        Ok(ChunkWriter {
            dir,
            limits,
            next_index: 0,
            open: None,
            on_close: None,
            closed: 0,
        })
    }

    /// Numbers the next chunk `index` (to continue a spool after a restart).
    pub fn with_start_index(mut self, index: u64) -> Self {
        self.next_index = index;
        self
    }

    /// Called with each chunk once it is closed and durable.
    pub fn on_close(mut self, f: impl FnMut(&ClosedChunk) + Send + 'static) -> Self {
        self.on_close = Some(Box::new(f));
        self
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The path of chunk `index` in `dir` once closed.
    pub fn chunk_path(dir: &Path, index: u64) -> PathBuf {
        dir.join(format!("chunk-{index}.cast"))
    }

    /// How many chunks have been closed so far.
    pub fn chunks_closed(&self) -> u64 {
        self.closed
    }

    /// Writes the header line to `header.json` in the directory, durably.
    pub fn write_header(&mut self, header: &Header) -> io::Result<()> {
        let path = self.dir.join(CHUNK_HEADER_FILE);
        let tmp = self.dir.join(format!("{CHUNK_HEADER_FILE}.part"));
        let mut f = File::create(&tmp)?;
        f.write_all(header.to_line().as_bytes())?;
        f.sync_all()?;
        fs::rename(&tmp, &path)?;
        sync_dir(&self.dir)
    }

    /// Appends one event line (ending in `\n`) at session time `time`, closing chunks as the
    /// limits require.
    pub fn push_line(&mut self, time: Duration, line: &[u8]) -> io::Result<()> {
        let len = line.len() as u64;
        if let Some(open) = &self.open {
            let too_big = open.bytes + len > self.limits.max_bytes;
            let too_old = time.saturating_sub(open.first_time) >= self.limits.max_age;
            if too_big || too_old {
                self.close()?;
            }
        }
        if self.open.is_none() {
            let index = self.next_index;
            let file = OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .open(self.part_path(index))?;
            self.next_index += 1;
            self.open = Some(Open {
                index,
                out: FileSink::from_writer(Box::new(file), String::new()),
                bytes: 0,
                events: 0,
                first_time: time,
                last_time: time,
            });
        }
        if let Some(open) = &mut self.open {
            if let Err(e) = open.out.put(line) {
                return Err(self.salvage(e));
            }
            open.bytes += len;
            open.events += 1;
            open.last_time = time;
            if open.bytes >= self.limits.max_bytes {
                self.close()?;
            }
        }
        Ok(())
    }

    /// When the open chunk must be closed by time, if there is one.
    pub fn deadline(&self) -> Option<Duration> {
        self.open
            .as_ref()
            .map(|o| o.first_time.saturating_add(self.limits.max_age))
    }

    /// Closes the open chunk if it is `max_age` old at session time `now`.
    pub fn tick(&mut self, now: Duration) -> io::Result<()> {
        match self.deadline() {
            Some(d) if now >= d => self.close().map(drop),
            _ => Ok(()),
        }
    }

    /// Closes the open chunk now (fsync, rename, fsync the directory). Returns it, if there
    /// was one.
    pub fn close(&mut self) -> io::Result<Option<ClosedChunk>> {
        let Some(open) = self.open.as_mut() else {
            return Ok(None);
        };
        if let Err(e) = open.out.finish() {
            return Err(self.salvage(e));
        }
        self.seal().map(Some)
    }

    /// After a failed write: keeps what reached the disk as a closed chunk (the sink cut it
    /// back to whole lines), or no chunk when nothing did, and gives back the write's error,
    /// which is what the caller reports.
    fn salvage(&mut self, e: io::Error) -> io::Error {
        let Some(index) = self.open.as_ref().map(|o| o.index) else {
            return e;
        };
        let part = self.part_path(index);
        let done = match self.open.as_mut() {
            Some(open) if open.out.written() > 0 => {
                // The lines kept are counted from the disk: this happens once a session at most.
                open.bytes = open.out.written();
                match open.out.finish().and_then(|()| count_lines(&part)) {
                    Ok(n) => {
                        open.events = n;
                        self.seal().map(drop)
                    }
                    Err(e) => Err(e),
                }
            }
            _ => {
                self.open = None;
                fs::remove_file(&part).and_then(|()| sync_dir(&self.dir))
            }
        };
        match done {
            Ok(()) => e,
            Err(e2) => {
                self.open = None;
                io::Error::new(
                    e.kind(),
                    format!("{e}; {} is left as it was: {e2}", part.display()),
                )
            }
        }
    }

    /// Puts the open chunk, already written and fsynced, under its final name.
    fn seal(&mut self) -> io::Result<ClosedChunk> {
        let Some(open) = self.open.take() else {
            return Err(io::Error::other("no open chunk"));
        };
        drop(open.out);
        let path = Self::chunk_path(&self.dir, open.index);
        fs::rename(self.part_path(open.index), &path)?;
        sync_dir(&self.dir)?;
        let closed = ClosedChunk {
            index: open.index,
            path,
            bytes: open.bytes,
            events: open.events,
            first_time: open.first_time,
            last_time: open.last_time,
        };
        self.closed += 1;
        if let Some(f) = &mut self.on_close {
            f(&closed);
        }
        Ok(closed)
    }

    fn part_path(&self, index: u64) -> PathBuf {
        self.dir.join(format!("chunk-{index}.cast.part"))
    }
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

fn count_lines(path: &Path) -> io::Result<u64> {
    let mut f = File::open(path)?;
    let mut buf = vec![0; 64 * 1024];
    let mut n = 0;
    loop {
        match f.read(&mut buf)? {
            0 => return Ok(n),
            r => n += memchr::memchr_iter(b'\n', &buf[..r]).count() as u64,
        }
    }
}

/// [`ChunkWriter`] as a session sink: `start` writes `header.json`, each asciicast event goes
/// into the chunks, chunks close on time even when the session is idle, and `finish` closes
/// the last one.
pub struct ChunkSink {
    writer: ChunkWriter,
}

impl ChunkSink {
    pub fn new(writer: ChunkWriter) -> Self {
        ChunkSink { writer }
    }

    pub fn writer(&self) -> &ChunkWriter {
        &self.writer
    }
}

impl Sink for ChunkSink {
    fn name(&self) -> String {
        format!("chunks {}", self.writer.dir.display())
    }

    fn start(&mut self, header: &Header) -> io::Result<()> {
        self.writer.write_header(header)
    }

    fn event(&mut self, event: &Event<'_>) -> io::Result<()> {
        match event.asciicast_line() {
            Some(line) => self.writer.push_line(event.time, line),
            None => Ok(()),
        }
    }

    fn max_line(&self) -> Option<usize> {
        Some(usize::try_from(self.writer.limits.max_bytes).unwrap_or(usize::MAX))
    }

    fn next_deadline(&self) -> Option<Duration> {
        self.writer.deadline()
    }

    fn tick(&mut self, now: Duration) -> io::Result<()> {
        self.writer.tick(now)
    }

    fn finish(&mut self) -> io::Result<()> {
        self.writer.close().map(drop)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn limits() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = ChunkWriter::new(
            dir.path(),
            ChunkLimits {
                max_bytes: 100,
                max_age: Duration::from_secs(2),
            },
        )
        .unwrap();
        let line = format!("[0.0, \"o\", \"{}\"]\n", "x".repeat(18));
        assert_eq!(line.len(), 33);
        for i in 0..10 {
            w.push_line(Duration::from_millis(i * 100), line.as_bytes())
                .unwrap();
        }
        // 3 lines per chunk (99 bytes): chunks 0..=2 closed, chunk 3 open with 1 line.
        assert_eq!(w.chunks_closed(), 3);
        w.push_line(Duration::from_secs(5), line.as_bytes())
            .unwrap();
        assert_eq!(w.chunks_closed(), 4, "closed on age");
        w.tick(Duration::from_secs(8)).unwrap();
        assert_eq!(w.chunks_closed(), 5, "closed on tick");
        assert!(w.close().unwrap().is_none());
        for i in 0..5 {
            assert!(ChunkWriter::chunk_path(dir.path(), i).exists());
        }
    }
}
