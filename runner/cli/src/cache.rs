//! `rave cache list|clear`: the project's `cache:` archives.

use std::path::PathBuf;

use clap::{Args, Subcommand};
use rave_engine::cache::CacheStore;
use rave_model::units::format_memory;

#[derive(Args, Debug)]
pub struct Where {
    /// Project directory (default: the repository containing the current directory).
    #[arg(short = 'C', long = "dir", value_name = "DIR")]
    pub dir: Option<PathBuf>,
    /// The project's state directory (default: .rave in the project; `rave serve` keeps one per
    /// project under its data dir, in workspaces/).
    #[arg(long, value_name = "DIR", env = "RAVE_STATE_DIR")]
    pub state_dir: Option<PathBuf>,
}

#[derive(Subcommand, Debug)]
pub enum CacheCommand {
    /// List the cache archives, most recently used first.
    List {
        #[command(flatten)]
        at: Where,
        /// One JSON document.
        #[arg(long)]
        json: bool,
    },
    /// Remove cache archives: all, or one key (with or without its -protected /
    /// -non_protected suffix).
    Clear {
        #[command(flatten)]
        at: Where,
        /// The key to remove (default: every archive).
        key: Option<String>,
    },
}

fn store(at: &Where) -> anyhow::Result<CacheStore> {
    let state = match &at.state_dir {
        Some(d) => d.clone(),
        None => crate::project::project_root(at.dir.as_deref())?.join(".rave"),
    };
    Ok(CacheStore::new(state.join("caches")))
}

pub fn run(c: &CacheCommand) -> anyhow::Result<i32> {
    match c {
        CacheCommand::List { at, json } => {
            let entries = store(at)?.list();
            if *json {
                println!("{}", serde_json::to_string_pretty(&entries)?);
                return Ok(0);
            }
            if entries.is_empty() {
                println!("no cache archives");
                return Ok(0);
            }
            let width = entries
                .iter()
                .map(|e| e.key.len())
                .max()
                .unwrap_or(3)
                .max(3);
            println!("{:<width$}  {:>10}  last used", "key", "size");
            for e in entries {
                let ago = e.last_used.elapsed().unwrap_or_default();
                let ago = humantime::format_duration(std::time::Duration::from_secs(ago.as_secs()));
                println!(
                    "{:<width$}  {:>10}  {ago} ago",
                    e.key,
                    format_memory(e.bytes)
                );
            }
            Ok(0)
        }
        CacheCommand::Clear { at, key } => {
            let n = store(at)?.clear(key.as_deref());
            match key {
                Some(k) if n == 0 => {
                    eprintln!("error: no cache archive with key `{k}` (see `rave cache list`)");
                    Ok(1)
                }
                _ => {
                    println!("removed {n} cache archive(s)");
                    Ok(0)
                }
            }
        }
    }
}
