//! `rave keys …` and `rave release create|verify`.

use std::path::{Path, PathBuf};

use clap::{Args, Subcommand};
use rave_stages::keys::{self, SigningKey};
use rave_stages::release::{self, ReleaseInfo};

#[derive(Subcommand, Debug)]
pub enum KeysCommand {
    /// Make a new Ed25519 signing key (OpenSSH format, private file mode 0600).
    Generate(KeysDir),
    /// List the current key and retired ones, with their ids.
    List(KeysDir),
    /// Retire the current key (kept for verifying old releases) and make a new one.
    Rotate(KeysDir),
}

#[derive(Args, Debug)]
pub struct KeysDir {
    /// Key directory (default: $RAVE_KEYS_DIR, else ~/.config/rave/keys).
    #[arg(long, value_name = "DIR")]
    pub dir: Option<PathBuf>,
}

fn keys_dir(d: &KeysDir) -> PathBuf {
    d.dir
        .clone()
        .or_else(|| std::env::var_os("RAVE_KEYS_DIR").map(PathBuf::from))
        .unwrap_or_else(|| {
            let home = std::env::var_os("HOME")
                .map(PathBuf::from)
                .unwrap_or_else(|| PathBuf::from("."));
            home.join(".config/rave/keys")
        })
}

pub fn keys(cmd: &KeysCommand) -> anyhow::Result<i32> {
    match cmd {
        KeysCommand::Generate(d) => {
            let dir = keys_dir(d);
            if dir.join("rave-release").exists() {
                eprintln!(
                    "error: {} already holds a key; use `rave keys rotate` to replace it",
                    dir.display()
                );
                return Ok(2);
            }
            let k = SigningKey::generate()?;
            let path = k.save(&dir)?;
            println!("{}  {}", k.id(), path.display());
        }
        KeysCommand::List(d) => {
            let dir = keys_dir(d);
            let all = keys::list(&dir);
            if all.is_empty() {
                eprintln!(
                    "no keys in {}; create one with `rave keys generate`",
                    dir.display()
                );
            }
            for (id, path, current) in all {
                println!(
                    "{id}  {}  {}",
                    if current { "current" } else { "retired" },
                    path.display()
                );
            }
        }
        KeysCommand::Rotate(d) => {
            let k = keys::rotate(&keys_dir(d))?;
            println!("{}  current (the previous key is under retired/)", k.id());
        }
    }
    Ok(0)
}

#[derive(Subcommand, Debug)]
pub enum ReleaseCommand {
    /// Write and sign release-manifest.json and provenance.intoto.json for the files in DIR.
    Create(CreateArgs),
    /// Check a manifest's signature and every artifact's digest.
    Verify(VerifyArgs),
    /// Publish a release directory to a forge (GitLab, Gitea/Forgejo, GitHub); safe to rerun.
    Publish(PublishArgs),
    /// List the releases published in this project's store.
    List(StoreArgs),
    /// Fetch a published release's artifacts (e.g. to roll back), verified.
    Download(DownloadArgs),
}

#[derive(Args, Debug)]
pub struct PublishArgs {
    /// Directory made by `rave release create`.
    #[arg(long, value_name = "DIR", default_value = "release")]
    pub dir: PathBuf,
    /// gitlab, gitea (also forgejo) or github.
    #[arg(long)]
    pub forge: String,
    /// API base URL (e.g. https://gitlab.example.com/api/v4, https://codeberg.org/api/v1,
    /// https://api.github.com).
    #[arg(long, value_name = "URL")]
    pub api: String,
    /// GitLab project id or path; Gitea/GitHub owner/repo.
    #[arg(long)]
    pub project: String,
    /// Milliseconds before the first retry of a 5xx (doubles each time).
    #[arg(long, default_value_t = 500)]
    pub backoff_ms: u64,
}

#[derive(Args, Debug)]
pub struct StoreArgs {
    /// The store (default: $RAVE_DATA_DIR, else .rave in the project: the repository
    /// containing the current directory, as for `rave run`).
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
}

#[derive(Args, Debug)]
pub struct DownloadArgs {
    pub tag: String,
    /// Where to put the files (created; must not exist yet).
    #[arg(long, value_name = "DIR")]
    pub to: PathBuf,
    /// allowed_signers file with the trusted keys.
    #[arg(long, value_name = "FILE", conflicts_with = "pubkey")]
    pub allowed_signers: Option<PathBuf>,
    /// A trusted public key: OpenSSH (`.pub`, checks `.sig`) or minisign (`minisign.pub`,
    /// checks `.minisig`).
    #[arg(long, value_name = "FILE")]
    pub pubkey: Option<PathBuf>,
    #[command(flatten)]
    pub store: StoreArgs,
}

fn store_of(a: &StoreArgs) -> rave_store::Store {
    let dir = a
        .data_dir
        .clone()
        .or_else(|| env("RAVE_DATA_DIR").map(PathBuf::from))
        .unwrap_or_else(|| {
            crate::project::project_root(None)
                .unwrap_or_else(|_| PathBuf::from("."))
                .join(".rave")
        });
    rave_store::Store::open(&dir)
}

#[derive(Args, Debug)]
pub struct CreateArgs {
    /// Directory holding the release's files (default: release).
    #[arg(long, value_name = "DIR", default_value = "release")]
    pub dir: PathBuf,
    /// Tag (default: CI_COMMIT_TAG).
    #[arg(long)]
    pub tag: Option<String>,
    /// Private key file (default: RAVE_SIGNING_KEY holding the key, or RAVE_SIGNING_KEY_FILE).
    #[arg(long, value_name = "FILE")]
    pub key: Option<PathBuf>,
    /// Scan summary to embed (`rave scan --summary` output).
    #[arg(long, value_name = "FILE")]
    pub scan_summary: Option<PathBuf>,
    /// Days the artifacts are kept (recorded in the manifest).
    #[arg(long, default_value_t = 365)]
    pub expire_days: u64,
    /// created_at (RFC 3339); default: SOURCE_DATE_EPOCH, else now.
    #[arg(long)]
    pub created_at: Option<String>,
    /// Also publish into this store (default: $RAVE_DATA_DIR, which `rave run` sets).
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// Replace a release of this tag that is already published with other content (the old
    /// one is kept and the replacement recorded). Without it, a published release is final.
    #[arg(long, env = "RAVE_RELEASE_REPLACE", value_parser = clap::builder::BoolishValueParser::new(), default_value_t = false)]
    pub replace: bool,
}

#[derive(Args, Debug)]
pub struct VerifyArgs {
    /// The release-manifest.json to check (its signature is the .sig next to it).
    pub manifest: PathBuf,
    /// allowed_signers file with the trusted keys.
    #[arg(long, value_name = "FILE", conflicts_with = "pubkey")]
    pub allowed_signers: Option<PathBuf>,
    /// A trusted public key: OpenSSH (`.pub`, checks `.sig`) or minisign (`minisign.pub`,
    /// checks `.minisig`).
    #[arg(long, value_name = "FILE")]
    pub pubkey: Option<PathBuf>,
    /// Where the artifacts are (default: the manifest's directory).
    #[arg(long, value_name = "DIR")]
    pub artifacts: Option<PathBuf>,
}

fn env(k: &str) -> Option<String> {
    std::env::var(k).ok().filter(|v| !v.is_empty())
}

/// What the run included from outside the repository (`rave run` writes it next to the run's
/// files), for the provenance.
fn included_files() -> Vec<(String, String, String)> {
    let Some(dir) = env("RAVE_RUN_DIR") else {
        return Vec::new();
    };
    std::fs::read_to_string(Path::new(&dir).join("includes.json"))
        .ok()
        .and_then(|t| serde_json::from_str::<Vec<rave_model::external::IncludedFile>>(&t).ok())
        .unwrap_or_default()
        .into_iter()
        .map(|f| (f.kind, f.location, f.resolved))
        .collect()
}

fn signing_key(args: &CreateArgs) -> anyhow::Result<SigningKey> {
    if let Some(p) = &args.key {
        return Ok(SigningKey::from_file(p)?);
    }
    if let Some(text) = env("RAVE_SIGNING_KEY") {
        return Ok(SigningKey::from_openssh(&text, "RAVE_SIGNING_KEY")?);
    }
    if let Some(p) = env("RAVE_SIGNING_KEY_FILE") {
        return Ok(SigningKey::from_file(Path::new(&p))?);
    }
    // The key `rave keys generate` made, where it put it. Not inside a job with a clean
    // environment (`rave serve`): there the key must come from the project's variables.
    let default = keys_dir(&KeysDir { dir: None }).join("rave-release");
    if env("RAVE_CLEAN_ENV").is_none() && default.is_file() {
        return Ok(SigningKey::from_file(&default)?);
    }
    anyhow::bail!(
        "no signing key: pass --key FILE, set RAVE_SIGNING_KEY (the key) or RAVE_SIGNING_KEY_FILE, or create one with `rave keys generate` (looked for {})",
        default.display()
    )
}

pub fn release(cmd: &ReleaseCommand) -> anyhow::Result<i32> {
    match cmd {
        ReleaseCommand::Create(args) => {
            let Some(tag) = args.tag.clone().or_else(|| env("CI_COMMIT_TAG")) else {
                eprintln!(
                    "error: no tag: this is not a tag pipeline (CI_COMMIT_TAG is empty); pass --tag"
                );
                return Ok(2);
            };
            let key = signing_key(args)?;
            let created_at = match (&args.created_at, env("SOURCE_DATE_EPOCH")) {
                (Some(c), _) => c.clone(),
                (None, Some(epoch)) => {
                    let secs: u64 = epoch
                        .parse()
                        .map_err(|_| anyhow::anyhow!("SOURCE_DATE_EPOCH must be seconds"))?;
                    humantime::format_rfc3339_seconds(
                        std::time::UNIX_EPOCH + std::time::Duration::from_secs(secs),
                    )
                    .to_string()
                }
                _ => humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string(),
            };
            let definition = ["pipeline.yml", ".gitlab-ci.yml"]
                .iter()
                .find(|f| Path::new(f).is_file())
                .and_then(|f| {
                    release::sha256_file(Path::new(f))
                        .ok()
                        .map(|(sha, _)| (f.to_string(), sha))
                });
            let scan_summary = match &args.scan_summary {
                Some(p) => Some(serde_json::from_str(&std::fs::read_to_string(p)?)?),
                None => None,
            };
            let info = ReleaseInfo {
                project: env("CI_PROJECT_PATH").unwrap_or_else(|| "local/project".into()),
                tag,
                commit: env("CI_COMMIT_SHA").unwrap_or_default(),
                pipeline: env("CI_PIPELINE_ID").unwrap_or_default(),
                job: env("CI_JOB_NAME").unwrap_or_default(),
                created_at,
                repository: env("CI_REPOSITORY_URL")
                    .or_else(|| env("CI_PROJECT_URL"))
                    .unwrap_or_else(|| {
                        format!("local/{}", env("CI_PROJECT_PATH").unwrap_or_default())
                    }),
                pipeline_definition: definition,
                scan_summary,
                included: included_files(),
            };
            // The store's index of this pipeline says which job made each file.
            let data_dir = args
                .data_dir
                .clone()
                .or_else(|| env("RAVE_DATA_DIR").map(PathBuf::from));
            let store = data_dir.as_deref().map(rave_store::Store::open);
            let producer = |sha: &str| -> Option<String> {
                let slug = store.as_ref()?.producer(&info.pipeline, sha)?;
                // Index files are named `<nnn>-<job slug>`.
                Some(
                    slug.split_once('-')
                        .map_or(slug.clone(), |(_, n)| n.to_string()),
                )
            };
            let signing_started = std::time::SystemTime::now();
            let written =
                release::write_release(&info, &args.dir, &key, args.expire_days, &producer)?;
            println!("signed with {}", key.id());
            // Inside a traced job: the signing is a span under the job's.
            crate::otel::child_span(
                format!("release sign {}", info.tag),
                signing_started,
                &[
                    ("rave.release.tag", info.tag.clone()),
                    ("rave.release.key", key.id()),
                    ("rave.release.files", written.len().to_string()),
                ],
            );
            for w in &written {
                println!("wrote {}", w.display());
            }
            if let Some(store) = &store {
                let artifacts: Vec<PathBuf> = release::list_files(&args.dir)?
                    .into_iter()
                    .map(|f| args.dir.join(f))
                    .filter(|p| !written.contains(p))
                    .collect();
                let dir = store.publish_release(&info.tag, &written, &artifacts, args.replace)?;
                println!("published {} to {}", info.tag, dir.display());
            }
            Ok(0)
        }
        ReleaseCommand::Publish(args) => {
            let Some(forge) = rave_stages::publish::Forge::parse(&args.forge) else {
                eprintln!(
                    "error: unknown --forge `{}`: use gitlab, gitea, forgejo or github",
                    args.forge
                );
                return Ok(2);
            };
            let Some(token) = env("RAVE_FORGE_TOKEN") else {
                eprintln!(
                    "error: set RAVE_FORGE_TOKEN to a token that may create releases (add it to RAVE_MASKED_VARIABLES)"
                );
                return Ok(2);
            };
            let manifest_path = args.dir.join(release::MANIFEST);
            let m = release::Manifest::read(&manifest_path)
                .map_err(|e| anyhow::anyhow!("{e}; run `rave release create` first"))?;
            let tag = m.tag.clone();
            let mut description = format!(
                "Signed with {}.\n\n| artifact | size | sha256 |\n|---|---|---|\n",
                m.key_id
            );
            for a in &m.artifacts {
                description.push_str(&format!("| {} | {} | `{}` |\n", a.path, a.size, a.sha256));
            }
            let assets: Vec<PathBuf> = release::list_files(&args.dir)?
                .into_iter()
                .map(|f| args.dir.join(f))
                .collect();
            let target = rave_stages::publish::Target {
                forge,
                api: args.api.clone(),
                project: args.project.clone(),
                token,
                backoff: std::time::Duration::from_millis(args.backoff_ms),
            };
            let r = rave_stages::publish::publish(&target, &tag, &tag, &description, &assets)?;
            println!(
                "{} release {tag}: {} asset(s) uploaded, {} already there",
                if r.created { "created" } else { "updated" },
                r.uploaded.len(),
                r.already_there.len()
            );
            Ok(0)
        }
        ReleaseCommand::List(args) => {
            let store = store_of(args);
            let tags = store.releases();
            if tags.is_empty() {
                eprintln!("no releases in {}", store.root().display());
            }
            for tag in tags {
                match store
                    .release_dir(&tag)
                    .map(|d| release::Manifest::read(&d.join(release::MANIFEST)))
                {
                    Some(Ok(m)) => println!(
                        "{tag:<16} {:<22} {:>3} artifact(s)  commit {}  key {}",
                        m.created_at,
                        m.artifacts.len(),
                        &m.commit[..m.commit.len().min(8)],
                        m.key_id,
                    ),
                    Some(Err(e)) => println!("{tag:<16} unreadable: {e}"),
                    None => println!("{tag:<16} ?"),
                }
            }
            Ok(0)
        }
        ReleaseCommand::Download(args) => {
            let store = store_of(&args.store);
            let Some(dir) = store.release_dir(&args.tag) else {
                eprintln!(
                    "error: no release `{}` in {}; `rave release list` shows what there is",
                    args.tag,
                    store.root().display()
                );
                return Ok(2);
            };
            let trusted = match (&args.allowed_signers, &args.pubkey) {
                (Some(p), _) | (None, Some(p)) => p.clone(),
                (None, None) => {
                    eprintln!(
                        "error: say which key to trust: --allowed-signers FILE or --pubkey FILE"
                    );
                    return Ok(2);
                }
            };
            let keys = keys::read_trusted(&trusted)?;
            if args.to.exists() {
                eprintln!(
                    "error: {} exists; download into a new directory",
                    args.to.display()
                );
                return Ok(2);
            }
            std::fs::create_dir_all(&args.to)?;
            for f in std::fs::read_dir(&dir)?.flatten() {
                std::fs::copy(f.path(), args.to.join(f.file_name()))?;
            }
            let manifest_path = args.to.join(release::MANIFEST);
            let m = release::Manifest::read(&manifest_path)?;
            for a in &m.artifacts {
                let (path, sha) = (a.path.as_str(), a.sha256.as_str());
                if path.starts_with('/') || path.split('/').any(|c| c == "..") {
                    eprintln!("error: the manifest names a path outside the release: {path}");
                    return Ok(1);
                }
                let Some(blob) = store.blob_path(sha).filter(|b| b.exists()) else {
                    eprintln!(
                        "error: {path} ({sha}) is no longer in the store (expired and collected?)"
                    );
                    return Ok(1);
                };
                let dest = args.to.join(path);
                if let Some(p) = dest.parent() {
                    std::fs::create_dir_all(p)?;
                }
                std::fs::copy(&blob, &dest)?;
            }
            match release::verify(&manifest_path, &keys, &args.to) {
                Ok((m, id)) => {
                    println!(
                        "downloaded {} into {}: signature by {id}, {} artifact(s) verified",
                        args.tag,
                        args.to.display(),
                        m.artifacts.len()
                    );
                    Ok(0)
                }
                Err(e) => {
                    eprintln!("FAILED: {e}");
                    Ok(1)
                }
            }
        }
        ReleaseCommand::Verify(args) => {
            let trusted = match (&args.allowed_signers, &args.pubkey) {
                (Some(p), _) | (None, Some(p)) => p.clone(),
                (None, None) => {
                    eprintln!(
                        "error: say which key to trust: --allowed-signers FILE or --pubkey FILE (the allowed_signers next to the manifest is the publisher's claim, not proof)"
                    );
                    return Ok(2);
                }
            };
            let keys = keys::read_trusted(&trusted)?;
            let dir = args
                .artifacts
                .clone()
                .or_else(|| args.manifest.parent().map(Path::to_path_buf))
                .unwrap_or_else(|| PathBuf::from("."));
            match release::verify(&args.manifest, &keys, &dir) {
                Ok((m, id)) => {
                    println!(
                        "OK: {} {} — signature by {id}, {} artifact(s) match",
                        m.project,
                        m.tag,
                        m.artifacts.len()
                    );
                    Ok(0)
                }
                Err(e) => {
                    eprintln!("FAILED: {e}");
                    Ok(1)
                }
            }
        }
    }
}

#[derive(Args, Debug)]
pub struct GcArgs {
    #[command(flatten)]
    pub store: StoreArgs,
    /// Also remove jobs' build directories not used for this long (their overlay layers and
    /// copies included; a directory a running job holds is kept).
    #[arg(long, value_name = "DURATION", default_value = "7d", value_parser = humantime::parse_duration)]
    pub workspaces_older_than: std::time::Duration,
    /// Also remove fetched includes (project mirrors, remote files) not used for this long.
    #[arg(long, value_name = "DURATION", default_value = "30d", value_parser = humantime::parse_duration)]
    pub includes_older_than: std::time::Duration,
}

/// `rave gc`: drop expired artifacts; keep what live releases reference.
pub fn gc(args: &GcArgs) -> anyhow::Result<i32> {
    let store = store_of(&args.store);
    let r = store.gc(rave_store::now_secs())?;
    println!(
        "{} expired artifact entr{} dropped, {} blob(s) deleted ({} bytes), {} kept for releases",
        r.expired_entries,
        if r.expired_entries == 1 { "y" } else { "ies" },
        r.deleted_blobs,
        r.deleted_bytes,
        r.kept_for_releases
    );
    // Build directories: the project's own (`.rave/builds`), or every project's of a server's
    // data dir (`workspaces/<project>/builds`).
    let root = store.root().to_path_buf();
    let mut builds = vec![root.join("builds")];
    if let Ok(rd) = std::fs::read_dir(root.join("workspaces")) {
        builds.extend(rd.flatten().map(|e| e.path().join("builds")));
    }
    let pruned: usize = builds
        .into_iter()
        .filter(|b| b.is_dir())
        .map(|b| rave_engine::builds::Builds::new(b).prune(args.workspaces_older_than))
        .sum();
    println!(
        "{pruned} build director{} unused for {} removed",
        if pruned == 1 { "y" } else { "ies" },
        humantime::format_duration(args.workspaces_older_than)
    );
    let includes =
        rave_includes::ForgeIncludes::prune(&root.join("includes"), args.includes_older_than);
    println!(
        "{includes} cached include(s) unused for {} removed",
        humantime::format_duration(args.includes_older_than)
    );
    Ok(0)
}
