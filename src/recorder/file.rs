//! The asciicast file sink: the header line, then one line per event, made durable at the end.

use super::event::Event;
use super::sink::Sink;
use std::fs::{File, OpenOptions};
use std::io::{self, BufWriter, Write};
use std::path::Path;
use ztna_common::asciicast::Header;

/// Writes a whole asciicast v2 recording to one file (or any writer).
pub struct FileSink {
    out: BufWriter<Box<dyn WriteSync>>,
    name: String,
    durable: bool,
}

/// A writer that can also be made durable (a `File` is fsynced; other writers just flush).
pub trait WriteSync: Write + Send {
    fn sync(&mut self) -> io::Result<()> {
        self.flush()
    }
}

impl WriteSync for File {
    fn sync(&mut self) -> io::Result<()> {
        self.sync_data()
    }
}

impl WriteSync for Vec<u8> {}

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
            out: BufWriter::with_capacity(BUF, writer),
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
}

impl Sink for FileSink {
    fn name(&self) -> String {
        self.name.clone()
    }

    fn start(&mut self, header: &Header) -> io::Result<()> {
        self.out.write_all(header.to_line().as_bytes())
    }

    fn event(&mut self, event: &Event<'_>) -> io::Result<()> {
        match event.asciicast_line() {
            Some(line) => self.out.write_all(line.as_bytes()),
            None => Ok(()),
        }
    }

    fn finish(&mut self) -> io::Result<()> {
        self.out.flush()?;
        if self.durable {
            self.out.get_mut().sync()?;
        }
        Ok(())
    }
}
