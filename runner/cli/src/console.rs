//! Live console output of a run: each job's lines prefixed by its name, start/finish lines,
//! and the summary table. A subscriber of the engine's streams; it also writes the log files.

use std::collections::HashMap;
use std::io::Write;

use rave_engine::event::RunEvent;
use rave_engine::logs::LogFiles;
use rave_engine::mask::{Masker, Pending};
use rave_engine::{Event, JobRecord, JobStatus, LogChunk, Stream};
use rave_model::units::format_memory;
use tokio::sync::mpsc;

pub struct Console {
    pub names: Vec<String>,
    pub color: bool,
    /// Write live output to stderr (when stdout carries `--json`).
    pub to_stderr: bool,
    pub width: usize,
    /// Secret values replaced by `[MASKED]` in the console and the log files.
    pub masker: Masker,
    /// What each job's stream keeps back until the next chunk shows whether it starts a
    /// secret.
    pub pending: HashMap<(usize, Stream), Pending>,
    /// `rave run --events FILE`: one JSON line per job state change, flushed as it happens
    /// (read by `rave serve` while the run goes on).
    pub events: Option<std::fs::File>,
}

const COLORS: [&str; 6] = ["36", "35", "33", "34", "32", "96"];

impl Console {
    fn prefix(&self, id: usize) -> String {
        let name = self.names.get(id).map_or("?", String::as_str);
        let mut shown: String = name.chars().take(self.width).collect();
        let pad = self.width.saturating_sub(shown.chars().count());
        shown.push_str(&" ".repeat(pad));
        if self.color {
            format!(
                "\x1b[{}m{shown}\x1b[0m \x1b[2m>\x1b[0m ",
                COLORS[id % COLORS.len()]
            )
        } else {
            format!("{shown} > ")
        }
    }

    fn paint(&self, code: &str, s: &str) -> String {
        if self.color {
            format!("\x1b[{code}m{s}\x1b[0m")
        } else {
            s.to_string()
        }
    }

    fn chunk(&self, out: &mut dyn Write, c: &LogChunk) {
        let prefix = self.prefix(c.job);
        for line in c.data.split_inclusive(|b| *b == b'\n') {
            let _ = out.write_all(prefix.as_bytes());
            if c.stream == Stream::System {
                let _ = out.write_all(self.paint("1", "[rave] ").as_bytes());
            }
            let _ = out.write_all(line);
            if !line.ends_with(b"\n") {
                let _ = out.write_all(b"\n");
            }
        }
    }

    fn event_line(&mut self, e: &Event) {
        let Some(f) = self.events.as_mut() else {
            return;
        };
        let v = match e {
            Event::JobStarted {
                id,
                attempt,
                memory_bytes,
                cpus,
            } => RunEvent::JobStarted {
                index: *id,
                attempt: *attempt,
                memory_limit_bytes: *memory_bytes,
                cpus: *cpus,
                at: rave_engine::event::rfc3339_millis(std::time::SystemTime::now()),
            },
            Event::JobRetrying {
                id,
                attempt,
                reason,
            } => RunEvent::JobRetrying {
                index: *id,
                attempt: *attempt,
                reason: *reason,
            },
            Event::JobFinished { id, record } => RunEvent::JobFinished {
                index: *id,
                record: record.clone(),
            },
        };
        let Ok(v) = serde_json::to_string(&v) else {
            return;
        };
        // One write per line: a reader never sees half a line it would take for whole.
        let _ = f.write_all(format!("{v}\n").as_bytes());
    }

    fn event(&self, out: &mut dyn Write, e: &Event) {
        match e {
            Event::JobStarted {
                id,
                attempt,
                memory_bytes,
                cpus,
            } => {
                let retry = if *attempt > 1 {
                    format!(", attempt {attempt}")
                } else {
                    String::new()
                };
                let text = format!(
                    "started ({}, {} CPU{retry})",
                    format_memory(*memory_bytes),
                    rave_engine::caps::format_cpus(*cpus)
                );
                let _ = writeln!(out, "{}{}", self.prefix(*id), self.paint("2", &text));
            }
            Event::JobRetrying {
                id,
                attempt,
                reason,
            } => {
                let text = format!("{} — retrying (attempt {attempt})", reason.as_str());
                let _ = writeln!(out, "{}{}", self.prefix(*id), self.paint("33", &text));
            }
            Event::JobFinished { id, record } => {
                if record.started_at.is_none() {
                    return;
                }
                let (code, word) = status_style(record.status);
                let mut text = format!("{word} in {}", duration(record.duration_ms));
                if let Some(p) = record.peak_memory_bytes {
                    text.push_str(&format!(
                        ", peak {} / {}",
                        format_memory(p),
                        format_memory(record.memory_limit_bytes)
                    ));
                }
                if let Some(n) = &record.note
                    && record.status != JobStatus::Success
                {
                    text.push_str(&format!(": {n}"));
                }
                let _ = writeln!(out, "{}{}", self.prefix(*id), self.paint(code, &text));
            }
        }
    }

    /// Mask a chunk (keeping back what may start a secret) and write it to the log file and
    /// the console.
    fn output(&mut self, out: &mut dyn Write, files: &mut LogFiles, mut c: LogChunk) {
        if !self.masker.is_empty() {
            let pending = self.pending.entry((c.job, c.stream)).or_default();
            c.data = self.masker.feed(pending, &c.data);
            if c.data.is_empty() {
                return;
            }
        }
        files.write(&c);
        self.chunk(out, &c);
    }

    /// The job ended: what its streams kept back is final.
    fn finish_job(&mut self, out: &mut dyn Write, files: &mut LogFiles, job: usize) {
        for stream in [Stream::Stdout, Stream::Stderr, Stream::System] {
            if let Some(mut p) = self.pending.remove(&(job, stream)) {
                let data = self.masker.finish(&mut p);
                if !data.is_empty() {
                    let c = LogChunk { job, stream, data };
                    files.write(&c);
                    self.chunk(out, &c);
                }
            }
        }
    }

    /// Consume both streams until they close. Log chunks already queued are written before an
    /// event that follows them, so a job's last lines come before its "finished" line.
    pub async fn run(
        mut self,
        mut events: mpsc::UnboundedReceiver<Event>,
        mut logs: mpsc::Receiver<LogChunk>,
        mut files: LogFiles,
    ) {
        let mut out: Box<dyn Write + Send> = if self.to_stderr {
            Box::new(std::io::BufWriter::with_capacity(
                64 * 1024,
                std::io::stderr(),
            ))
        } else {
            Box::new(std::io::BufWriter::with_capacity(
                64 * 1024,
                std::io::stdout(),
            ))
        };
        let mut events_open = true;
        let mut logs_open = true;
        while events_open || logs_open {
            tokio::select! {
                biased;
                c = logs.recv(), if logs_open => match c {
                    Some(c) => self.output(&mut out, &mut files, c),
                    None => logs_open = false,
                },
                e = events.recv(), if events_open => match e {
                    Some(e) => {
                        while let Ok(c) = logs.try_recv() {
                            self.output(&mut out, &mut files, c);
                        }
                        if let Event::JobFinished { id, .. } = &e {
                            self.finish_job(&mut out, &mut files, *id);
                            files.close(*id);
                        }
                        self.event(&mut out, &e);
                        self.event_line(&e);
                    }
                    None => events_open = false,
                },
            }
            if logs.is_empty() && events.is_empty() {
                // Idle: make everything so far visible, to the terminal and to anyone reading
                // the log files (`rave logs`, the server) while the job runs.
                let _ = out.flush();
                files.flush_all();
            }
        }
        let held: Vec<usize> = self.pending.keys().map(|(j, _)| *j).collect();
        for job in held {
            self.finish_job(&mut out, &mut files, job);
        }
        files.flush_all();
        let _ = out.flush();
    }
}

fn status_style(s: JobStatus) -> (&'static str, &'static str) {
    match s {
        JobStatus::Success => ("32", "success"),
        JobStatus::Failed => ("31;1", "failed"),
        JobStatus::Canceled => ("33", "canceled"),
        JobStatus::Skipped => ("2", "skipped"),
        JobStatus::Manual => ("2", "manual"),
        JobStatus::Warning => ("33", "warning"),
    }
}

pub fn duration(ms: Option<u64>) -> String {
    match ms {
        None => "-".into(),
        Some(ms) if ms < 1000 => format!("{ms}ms"),
        Some(ms) if ms < 60_000 => format!("{:.1}s", ms as f64 / 1000.0),
        Some(ms) => format!("{}m{:02}s", ms / 60_000, (ms / 1000) % 60),
    }
}

/// The table printed at the end of a run.
pub fn summary(records: &[&JobRecord], color: bool) -> String {
    // Each row with the status that colours it (a child pipeline's job has its own words).
    let mut rows: Vec<([String; 6], Option<JobStatus>)> = vec![(
        [
            "JOB".into(),
            "STAGE".into(),
            "STATUS".into(),
            "DURATION".into(),
            "MEMORY peak/limit".into(),
            "REASON".into(),
        ],
        None,
    )];
    for r in records {
        let mem = match r.peak_memory_bytes {
            Some(p) => format!(
                "{} / {}",
                format_memory(p),
                format_memory(r.memory_limit_bytes)
            ),
            None => format!("- / {}", format_memory(r.memory_limit_bytes)),
        };
        let reason = match (r.failure_reason, &r.note) {
            (Some(f), Some(n)) if r.status != JobStatus::Success => format!("{}: {n}", f.as_str()),
            (Some(f), None) => f.as_str().to_string(),
            (None, Some(n)) if r.status != JobStatus::Success => n.clone(),
            _ => match r.reused_from {
                Some(p) => format!("reused from pipeline #{p}"),
                None => String::new(),
            },
        };
        rows.push((
            [
                r.name.clone(),
                r.stage.clone(),
                r.status.as_str().to_string(),
                duration(r.duration_ms),
                mem,
                reason,
            ],
            Some(r.status),
        ));
        // A trigger job's child pipeline, under it.
        for c in &r.children {
            rows.push((
                [
                    format!("{} » {}", r.name, c.name),
                    c.stage.clone(),
                    c.status.clone(),
                    duration(c.duration_ms),
                    String::new(),
                    c.failure_reason.clone().unwrap_or_default(),
                ],
                None,
            ));
        }
    }
    let widths: Vec<usize> = (0..5)
        .map(|c| {
            rows.iter()
                .map(|(r, _)| r[c].chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut s = String::new();
    for (row, status) in &rows {
        let mut line = String::new();
        for c in 0..5 {
            let cell = &row[c];
            let padded = format!("{cell}{}", " ".repeat(widths[c] - cell.chars().count()));
            if let (2, Some(st), true) = (c, status, color) {
                line.push_str(&format!("\x1b[{}m{padded}\x1b[0m  ", status_style(*st).0));
            } else {
                line.push_str(&padded);
                line.push_str("  ");
            }
        }
        line.push_str(&row[5]);
        s.push_str(line.trim_end());
        s.push('\n');
    }
    s
}
