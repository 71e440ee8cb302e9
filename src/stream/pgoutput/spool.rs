//! A transaction's rendered pieces, held until its commit: in memory up to a bound,
//! the rest in a temporary file that is unlinked as soon as it is created (so nothing
//! is left behind whatever happens to the process). Memory stays bounded whatever the
//! transaction's size.

use std::fs::{File, OpenOptions};
use std::io::{self, BufReader, BufWriter, Read, Seek, SeekFrom, Write};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::{Bytes, BytesMut};

/// Each piece is its length (u32, big-endian) then its bytes.
const LEN: usize = 4;
const FILE_BUFFER: usize = 64 * 1024;

pub(crate) struct Spool {
    limit: usize,
    memory: BytesMut,
    file: Option<BufWriter<File>>,
    dir: PathBuf,
}

impl Spool {
    /// Holds up to `limit` bytes in memory, then spills into a file in `dir`.
    pub fn new(limit: usize, dir: PathBuf) -> Spool {
        Spool { limit, memory: BytesMut::new(), file: None, dir }
    }

    pub fn push(&mut self, piece: &[u8]) -> io::Result<()> {
        let len = u32::try_from(piece.len())
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "a change of 4 GiB or more"))?;
        if self.file.is_none() && self.memory.len() + LEN + piece.len() <= self.limit {
            self.memory.extend_from_slice(&len.to_be_bytes());
            self.memory.extend_from_slice(piece);
            return Ok(());
        }
        let file = match &mut self.file {
            Some(file) => file,
            None => self.file.insert(BufWriter::with_capacity(FILE_BUFFER, unlinked_file(&self.dir)?)),
        };
        file.write_all(&len.to_be_bytes())?;
        file.write_all(piece)
    }

    /// Whether any piece went to a file.
    pub(crate) fn spilled(&self) -> bool {
        self.file.is_some()
    }

    /// The pieces, in the order they were pushed.
    pub(crate) fn into_reader(self) -> io::Result<SpoolReader> {
        let file = match self.file {
            Some(writer) => {
                let mut file = writer.into_inner().map_err(|e| e.into_error())?;
                file.seek(SeekFrom::Start(0))?;
                Some(BufReader::with_capacity(FILE_BUFFER, file))
            }
            None => None,
        };
        Ok(SpoolReader { memory: self.memory.freeze(), file })
    }
}

pub(crate) struct SpoolReader {
    memory: Bytes,
    file: Option<BufReader<File>>,
}

impl SpoolReader {
    pub(crate) fn next_piece(&mut self) -> io::Result<Option<Bytes>> {
        if self.memory.len() >= LEN {
            let mut len = [0u8; LEN];
            len.copy_from_slice(&self.memory[..LEN]);
            let len = u32::from_be_bytes(len) as usize;
            let piece = self.memory.slice(LEN..LEN + len.min(self.memory.len() - LEN));
            self.memory = self.memory.slice(LEN + piece.len()..);
            return Ok(Some(piece));
        }
        let Some(file) = &mut self.file else { return Ok(None) };
        let mut len = [0u8; LEN];
        match file.read_exact(&mut len) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                self.file = None;
                return Ok(None);
            }
            Err(e) => return Err(e),
        }
        let mut piece = vec![0u8; u32::from_be_bytes(len) as usize];
        file.read_exact(&mut piece)?;
        Ok(Some(Bytes::from(piece)))
    }
}

/// A new file in `dir`, already unlinked: it lives as long as its handle.
fn unlinked_file(dir: &std::path::Path) -> io::Result<File> {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    loop {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let path = dir.join(format!("pgdeltastream-txn-{}-{n}", std::process::id()));
        match OpenOptions::new().read(true).write(true).create_new(true).open(&path) {
            Ok(file) => {
                std::fs::remove_file(&path)?;
                return Ok(file);
            }
            // Left by an earlier process with the same pid: take the next name.
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn drain(spool: Spool) -> Vec<Bytes> {
        let mut reader = spool.into_reader().unwrap();
        let mut out = Vec::new();
        while let Some(p) = reader.next_piece().unwrap() {
            out.push(p);
        }
        out
    }

    #[test]
    fn small_transactions_stay_in_memory() {
        let mut spool = Spool::new(1024, std::env::temp_dir());
        for p in ["a", "", "bc"] {
            spool.push(p.as_bytes()).unwrap();
        }
        assert!(!spool.spilled());
        assert_eq!(drain(spool), ["a", "", "bc"]);
    }

    #[test]
    fn large_ones_spill_in_order_and_leave_no_file() {
        let dir = std::env::temp_dir().join(format!("spool-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut spool = Spool::new(64, dir.clone());
        let pieces: Vec<String> = (0..1000).map(|i| format!("piece {i}")).collect();
        for p in &pieces {
            spool.push(p.as_bytes()).unwrap();
        }
        assert!(spool.spilled());
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 0, "the file is unlinked at once");
        assert_eq!(drain(spool), pieces);
        std::fs::remove_dir(&dir).unwrap();
    }
}
