//! Per-job log files: each job's output appended as it arrives, flushed when the job ends.

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::PathBuf;

use crate::executor::{LogChunk, Stream};

pub struct LogFiles {
    paths: Vec<PathBuf>,
    open: HashMap<usize, BufWriter<File>>,
}

impl LogFiles {
    /// `paths[job]` is where job `job`'s log goes.
    pub fn new(paths: Vec<PathBuf>) -> Self {
        LogFiles {
            paths,
            open: HashMap::new(),
        }
    }

    pub fn write(&mut self, chunk: &LogChunk) {
        let Some(path) = self.paths.get(chunk.job) else {
            return;
        };
        let w = match self.open.entry(chunk.job) {
            std::collections::hash_map::Entry::Occupied(o) => o.into_mut(),
            std::collections::hash_map::Entry::Vacant(v) => {
                if let Some(dir) = path.parent() {
                    let _ = std::fs::create_dir_all(dir);
                }
                match std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)
                {
                    Ok(f) => v.insert(BufWriter::with_capacity(64 * 1024, f)),
                    Err(_) => return,
                }
            }
        };
        if chunk.stream == Stream::System {
            let _ = w.write_all(b"[rave] ");
        }
        let _ = w.write_all(&chunk.data);
    }

    /// Flush and close a job's log (at the end of the job).
    pub fn close(&mut self, job: usize) {
        if let Some(mut w) = self.open.remove(&job) {
            let _ = w.flush();
        }
    }

    pub fn flush_all(&mut self) {
        for w in self.open.values_mut() {
            let _ = w.flush();
        }
    }
}
