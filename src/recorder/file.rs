//! The asciicast file sink: the header line, then one line per event. What the recorder has
//! handled is in the file after each of its batches (a killed recorder leaves what it had,
//! and the file can be followed while it grows); it is made durable at the end. A write that
//! fails (disk full) is cut back to the last whole line, so the file stays playable.

use super::event::Event;
use super::sink::Sink;
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::path::Path;
use ztna_common::asciicast::Header;

/// Writes a whole asciicast v2 recording to one file (or any writer).
pub struct FileSink {
    out: Box<dyn WriteSync>,
    /// Lines not yet handed to `out`: at most [`BUF`] (a longer line goes out directly).
    buf: Vec<u8>,
    /// Bytes `out` has taken, all of them whole lines.
    written: u64,
    name: String,
    durable: bool,
}

/// A writer that can also be made durable (a `File` is fsynced; other writers just flush).
pub trait WriteSync: Write + Send {
    fn sync(&mut self) -> io::Result<()> {
        self.flush()
    }

    /// Drops what lies past `len` (the part of a line a failed write left). A writer that
    /// cannot does nothing.
    fn cut(&mut self, _len: u64) -> io::Result<()> {
        Ok(())
    }
}

impl WriteSync for File {
    fn sync(&mut self) -> io::Result<()> {
        self.sync_data()
    }

    fn cut(&mut self, len: u64) -> io::Result<()> {
        self.set_len(len)
    }
}

impl WriteSync for Vec<u8> {
    fn cut(&mut self, len: u64) -> io::Result<()> {
        self.truncate(usize::try_from(len).unwrap_or(usize::MAX));
        Ok(())
    }
}

const BUF: usize = 32 * 1024;

impl FileSink {
    /// Creates `path`. An existing file is an error (`AlreadyExists`) unless `overwrite`.
    pub fn create(path: &Path, overwrite: bool) -> io::Result<Self> {
        let mut opts = OpenOptions::new();
        opts.write(true);
        if overwrite {
            opts.create(true).truncate(true);
        } else {
            opts.create_new(true);
        }
        let file = opts.open(path)?;
        Ok(Self::from_writer(
            Box::new(file),
            format!("file {}", path.display()),
        ))
    }

    /// Records to any writer.
    pub fn from_writer(writer: Box<dyn WriteSync>, name: String) -> Self {
        FileSink {
            out: writer,
            buf: Vec::with_capacity(BUF),
            written: 0,
            name,
            durable: true,
        }
    }

    /// Whether `finish` fsyncs (the default) or only flushes to the kernel, as `script` and
    /// asciinema do: an fsync costs milliseconds at the end of every recording.
    pub fn durable(mut self, durable: bool) -> Self {
        self.durable = durable;
        self
    }

    /// Takes whole lines: they reach the writer on [`flush`](Sink::flush), when the buffer is
    /// full, or at once when longer than it.
    pub(super) fn put(&mut self, line: &[u8]) -> io::Result<()> {
        if self.buf.len() + line.len() > BUF {
            self.write_buffered()?;
        }
        if line.len() > BUF {
            return self.write_lines(line);
        }
        self.buf.extend_from_slice(line);
        Ok(())
    }

    /// Bytes the writer has taken, all of them whole lines.
    pub(super) fn written(&self) -> u64 {
        self.written
    }

    fn write_buffered(&mut self) -> io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let buf = std::mem::take(&mut self.buf);
        let r = self.write_lines(&buf);
        self.buf = buf;
        self.buf.clear();
        r
    }

    /// Hands whole lines to the writer; on failure, cuts the file back to the last whole line
    /// it took.
    fn write_lines(&mut self, lines: &[u8]) -> io::Result<()> {
        let mut done = 0;
        while done < lines.len() {
            match self.out.write(&lines[done..]) {
                Ok(0) => return self.cut_after(lines, done, io::ErrorKind::WriteZero.into()),
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return self.cut_after(lines, done, e),
            }
        }
        self.written += lines.len() as u64;
        Ok(())
    }

    fn cut_after(&mut self, lines: &[u8], done: usize, e: io::Error) -> io::Result<()> {
        let whole = memchr::memrchr(b'\n', &lines[..done]).map_or(0, |i| i + 1);
        self.written += whole as u64;
        if whole < done {
            // Best effort: the error that matters is the write's.
            let _ = self.out.cut(self.written);
        }
        Err(e)
    }
}

impl Sink for FileSink {
    fn name(&self) -> String {
        self.name.clone()
    }

    fn start(&mut self, header: &Header) -> io::Result<()> {
        self.put(header.to_line().as_bytes())?;
        self.write_buffered()
    }

    fn event(&mut self, event: &Event<'_>) -> io::Result<()> {
        match event.asciicast_line() {
            Some(line) => self.put(line),
            None => Ok(()),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        self.write_buffered()
    }

    fn finish(&mut self) -> io::Result<()> {
        self.write_buffered()?;
        self.out.flush()?;
        if self.durable {
            self.out.sync()?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    /// Takes `room` bytes, then fails as a full disk does, after taking part of the write.
    struct Disk {
        data: Arc<Mutex<Vec<u8>>>,
        room: usize,
    }

    impl Write for Disk {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            let mut d = self.data.lock().unwrap();
            let n = b.len().min(self.room - d.len());
            if n == 0 {
                return Err(io::Error::from(io::ErrorKind::StorageFull));
            }
            d.extend_from_slice(&b[..n]);
            Ok(n)
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    impl WriteSync for Disk {
        fn cut(&mut self, len: u64) -> io::Result<()> {
            self.data.lock().unwrap().truncate(len as usize);
            Ok(())
        }
    }

    #[test]
    fn a_failed_write_leaves_whole_lines() {
        let data = Arc::new(Mutex::new(Vec::new()));
        let disk = Disk {
            data: data.clone(),
            room: 100,
        };
        let mut s = FileSink::from_writer(Box::new(disk), "disk".into());
        let line = b"[0.1, \"o\", \"0123456789012345678901234567890\"]\n";
        s.put(line).unwrap();
        s.flush().unwrap();
        assert_eq!(*data.lock().unwrap(), line, "flushed after a batch");
        s.put(line).unwrap();
        s.put(line).unwrap();
        assert!(s.flush().is_err());
        // The second line fitted, the third only in part: it is cut off.
        assert_eq!(*data.lock().unwrap(), [&line[..], &line[..]].concat());
    }
}
