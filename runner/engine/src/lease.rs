//! A run's lease on a budget it shares with other runs: under `rave serve`, every pipeline's
//! `rave run` connects to the server's budget socket, says which of its jobs are ready, and
//! starts a job only when the server grants it (see [`crate::share`] for the order). What a
//! run holds is tied to its connection: a run that ends or dies frees it all.
//!
//! The protocol is one JSON object per line, both ways, over a Unix socket:
//! `hello` once, then `want` (the whole ready set, each time it changes) and `release` (a job
//! ended); the server answers `grant` or `refuse` per job, and sends `cancel` to stop one.

use std::path::Path;
use std::sync::Mutex;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tokio::sync::mpsc;

/// A pipeline's own budget (its profile), within the host's.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Cap {
    pub memory_bytes: u64,
    pub cpus: f64,
    pub jobs: u32,
}

/// A ready job waiting for room.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Wanted {
    /// The job's index in the run's plan.
    pub job: usize,
    pub name: String,
    pub memory_bytes: u64,
    pub cpus: f64,
    /// Its remaining critical path (larger first).
    pub priority: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resource_group: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ToBroker {
    Hello {
        pipeline: u64,
        project: String,
        cap: Cap,
    },
    Want {
        jobs: Vec<Wanted>,
    },
    Release {
        job: usize,
    },
    /// A `trigger: project` job: start that project's pipeline (the job holds no budget
    /// while it waits).
    Trigger {
        job: usize,
        project: String,
        branch: Option<String>,
        variables: Vec<(String, String)>,
        /// Tell how the downstream pipeline ends (`strategy: depend`).
        depend: bool,
    },
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum FromBroker {
    Grant {
        job: usize,
    },
    Refuse {
        job: usize,
        reason: String,
    },
    /// Stop this job (GitLab's cancel of one job): after_script runs, what needs it is skipped.
    Cancel {
        job: usize,
    },
    /// The downstream pipeline of a `trigger: project` job was queued, or could not be.
    Triggered {
        job: usize,
        pipeline: Option<i64>,
        error: Option<String>,
    },
    /// The downstream pipeline of a `strategy: depend` trigger ended.
    Downstream {
        job: usize,
        pipeline: i64,
        status: String,
    },
}

/// A connected run's side of the lease.
pub struct Client {
    out: mpsc::UnboundedSender<ToBroker>,
    incoming: Mutex<Option<mpsc::UnboundedReceiver<FromBroker>>>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("lease::Client")
    }
}

impl Client {
    /// Connect and say hello. Must be called inside a tokio runtime: it spawns the tasks that
    /// write and read the socket.
    pub async fn connect(path: &Path, hello: ToBroker) -> std::io::Result<Client> {
        let stream = UnixStream::connect(path).await.map_err(|e| {
            std::io::Error::new(
                e.kind(),
                format!(
                    "cannot reach the server's budget at {}: {e}",
                    path.display()
                ),
            )
        })?;
        let (read, mut write) = stream.into_split();
        let (out, mut out_rx) = mpsc::unbounded_channel::<ToBroker>();
        let (in_tx, in_rx) = mpsc::unbounded_channel();
        out.send(hello).ok();
        tokio::spawn(async move {
            while let Some(m) = out_rx.recv().await {
                let Ok(mut line) = serde_json::to_vec(&m) else {
                    continue;
                };
                line.push(b'\n');
                if write.write_all(&line).await.is_err() {
                    break;
                }
            }
        });
        tokio::spawn(async move {
            let mut lines = BufReader::new(read).lines();
            // The channel closes when the server goes away: the run sees that as the end of
            // its lease.
            while let Ok(Some(line)) = lines.next_line().await {
                match serde_json::from_str::<FromBroker>(&line) {
                    Ok(m) => {
                        if in_tx.send(m).is_err() {
                            break;
                        }
                    }
                    Err(e) => eprintln!("rave: ignored a budget message ({e}): {line}"),
                }
            }
        });
        Ok(Client {
            out,
            incoming: Mutex::new(Some(in_rx)),
        })
    }

    pub fn send(&self, m: ToBroker) {
        let _ = self.out.send(m);
    }

    /// The server's answers; taken once, by the scheduler.
    pub fn take_incoming(&self) -> Option<mpsc::UnboundedReceiver<FromBroker>> {
        self.incoming
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_are_tagged_json_lines() {
        let m = ToBroker::Release { job: 3 };
        assert_eq!(
            serde_json::to_string(&m).unwrap(),
            r#"{"type":"release","job":3}"#
        );
        let back: FromBroker = serde_json::from_str(r#"{"type":"grant","job":2}"#).unwrap();
        assert_eq!(back, FromBroker::Grant { job: 2 });
    }
}
