//! Facts rave reads from a git repository: where it is, what is checked out, which files it
//! holds, what changed, and a copy of its files for a job's working directory.
//!
//! Reads go through libgit2 (git2), so rave does not depend on a `git` binary at run time.

use std::path::{Path, PathBuf};

use git2::{Repository, Status, StatusOptions};

#[derive(Debug, thiserror::Error)]
pub enum RepoError {
    #[error("{path} is not inside a git repository")]
    NotARepository { path: PathBuf },
    #[error("git: {context}: {source}")]
    Git {
        context: String,
        #[source]
        source: git2::Error,
    },
    #[error("cannot copy {path}: {source}")]
    Copy {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// The files [`Repo::write_job_git`] writes.
pub const JOB_GIT_FILES: [&str; 6] = [
    "HEAD",
    "config",
    "objects/info/alternates",
    "packed-refs",
    "index",
    "refs/heads/.keep",
];

fn git<T>(r: Result<T, git2::Error>, context: &str) -> Result<T, RepoError> {
    r.map_err(|source| RepoError::Git {
        context: context.to_string(),
        source,
    })
}

/// The working tree as git sees it.
#[derive(Clone, Debug, Default)]
pub struct Listing {
    /// Tracked files present in the working tree (what `include: local` may read).
    pub tracked: Vec<String>,
    /// Those and the untracked files git does not ignore: what a job's directory holds.
    pub files: Vec<String>,
    /// Blob id and mode of each tracked file whose working copy is unmodified.
    pub ids: std::collections::HashMap<String, String>,
}

/// What is checked out.
#[derive(Clone, Debug)]
pub struct Head {
    /// Full sha, or 40 zeros in a repository without commits.
    pub sha: String,
    /// Branch name; None when detached.
    pub branch: Option<String>,
    /// A tag pointing at HEAD, if any.
    pub tag: Option<String>,
}

pub struct Repo {
    repo: Repository,
    root: PathBuf,
}

impl Repo {
    /// Open the repository containing `dir`.
    pub fn discover(dir: &Path) -> Result<Repo, RepoError> {
        let repo = Repository::discover(dir).map_err(|_| RepoError::NotARepository {
            path: dir.to_path_buf(),
        })?;
        let root =
            repo.workdir()
                .map(Path::to_path_buf)
                .ok_or_else(|| RepoError::NotARepository {
                    path: dir.to_path_buf(),
                })?;
        Ok(Repo { repo, root })
    }

    /// The working tree's top directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The object directory of this repository (shared by its worktrees).
    pub fn objects_dir(&self) -> PathBuf {
        let o = self.repo.commondir().join("objects");
        o.canonicalize().unwrap_or(o)
    }

    /// What the job `.git` of `sha` depends on: the commit, the branch, the tags.
    pub fn job_git_stamp(&self, sha: &str, branch: Option<&str>) -> String {
        use std::fmt::Write;
        let mut s = format!(
            "{sha}\n{}\n{}\n",
            branch.unwrap_or(""),
            self.objects_dir().display()
        );
        let _ = self.repo.tag_foreach(|id, name| {
            let _ = writeln!(s, "{id} {}", String::from_utf8_lossy(name));
            true
        });
        // Not a security boundary, only a cache key: std's hasher twice, 128 bits.
        use std::hash::{Hash, Hasher};
        let mut a = std::collections::hash_map::DefaultHasher::new();
        s.hash(&mut a);
        let mut b = std::collections::hash_map::DefaultHasher::new();
        (s, 1u8).hash(&mut b);
        format!("{:016x}{:016x}", a.finish(), b.finish())
    }

    /// Write the `.git` directory a job's working directory gets, into `dest`: HEAD detached
    /// at `sha` (as GitLab Runner checks a pipeline's commit out), the project's tags and
    /// `origin/<branch>` as packed refs, an index of the commit's tree, and no objects of its
    /// own: it borrows this repository's through `objects/info/alternates`, so writing it
    /// costs the same whatever the history's size. Returns the files written, relative to
    /// `dest`, and the object directory the alternates point at (a container needs it too).
    pub fn write_job_git(
        &self,
        dest: &Path,
        sha: &str,
        branch: Option<&str>,
    ) -> Result<(Vec<String>, PathBuf), RepoError> {
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| RepoError::Copy { path, source }
        };
        let oid = git(git2::Oid::from_str(sha), "commit id")?;
        let commit = git(self.repo.find_commit(oid), &format!("commit {sha}"))?;
        let tree = git(commit.tree(), "reading the commit's tree")?;
        std::fs::create_dir_all(dest.join("objects/info")).map_err(io(dest))?;
        std::fs::create_dir_all(dest.join("refs")).map_err(io(dest))?;
        let objects = self.objects_dir();
        let write = |rel: &str, text: String| -> Result<(), RepoError> {
            let p = dest.join(rel);
            std::fs::write(&p, text).map_err(io(&p))
        };
        write("HEAD", format!("{sha}\n"))?;
        // git wants a `refs/` directory; a snapshot holds files only, and git's ref walk skips
        // names starting with a dot.
        std::fs::create_dir_all(dest.join("refs/heads")).map_err(io(dest))?;
        write("refs/heads/.keep", String::new())?;
        let origin = self.origin_url().unwrap_or_default();
        write(
            "config",
            format!(
                "[core]\n\trepositoryformatversion = 0\n\tfilemode = true\n\tbare = false\n[remote \"origin\"]\n\turl = {origin}\n\tfetch = +refs/heads/*:refs/remotes/origin/*\n"
            ),
        )?;
        write(
            "objects/info/alternates",
            format!("{}\n", objects.display()),
        )?;
        let mut refs = vec![];
        if let Some(b) = branch {
            refs.push(format!("{sha} refs/remotes/origin/{b}"));
        }
        let mut tags = Vec::new();
        git(
            self.repo.tag_foreach(|id, name| {
                tags.push((id, String::from_utf8_lossy(name).into_owned()));
                true
            }),
            "listing tags",
        )?;
        tags.sort_by(|a, b| a.1.cmp(&b.1));
        for (id, name) in tags {
            refs.push(format!("{id} {name}"));
            if let Ok(t) = self.repo.find_tag(id) {
                refs.push(format!("^{}", t.target_id()));
            }
        }
        write(
            "packed-refs",
            format!(
                "# pack-refs with: peeled fully-peeled sorted \n{}\n",
                refs.join("\n")
            ),
        )?;
        let index_path = dest.join("index");
        let _ = std::fs::remove_file(&index_path);
        let mut index = git(git2::Index::open(&index_path), "creating the job's index")?;
        git(index.read_tree(&tree), "reading the commit's tree")?;
        git(index.write(), "writing the job's index")?;
        Ok((JOB_GIT_FILES.map(String::from).to_vec(), objects))
    }

    /// The commits a clone of depth `depth` from `sha` ends at (the `.git/shallow` file):
    /// commits `depth - 1` parents away whose parents it leaves out.
    pub fn shallow_boundary(&self, sha: &str, depth: u32) -> Result<Vec<String>, RepoError> {
        let oid = git(git2::Oid::from_str(sha), "commit id")?;
        let mut level = vec![oid];
        let mut seen = std::collections::HashSet::from([oid]);
        for _ in 1..depth {
            let mut next = Vec::new();
            for c in &level {
                let commit = git(self.repo.find_commit(*c), "walking history")?;
                for p in commit.parent_ids() {
                    if seen.insert(p) {
                        next.push(p);
                    }
                }
            }
            if next.is_empty() {
                return Ok(Vec::new());
            }
            level = next;
        }
        let mut out = Vec::new();
        for c in level {
            let commit = git(self.repo.find_commit(c), "walking history")?;
            if commit.parent_count() > 0 {
                out.push(c.to_string());
            }
        }
        out.sort();
        Ok(out)
    }

    /// Whether `.gitignore` rules (and `info/exclude`) ignore `rel` (a trailing `/` asks
    /// about a directory).
    pub fn is_ignored(&self, rel: &str) -> bool {
        self.repo.is_path_ignored(rel).unwrap_or(false)
    }

    pub fn head(&self) -> Result<Head, RepoError> {
        let head = match self.repo.head() {
            Ok(h) => h,
            Err(e) if e.code() == git2::ErrorCode::UnbornBranch => {
                // No commits yet: report the branch HEAD points at.
                let branch = self
                    .repo
                    .find_reference("HEAD")
                    .ok()
                    .and_then(|r| r.symbolic_target().ok().flatten().map(str::to_string))
                    .map(|t| t.trim_start_matches("refs/heads/").to_string());
                return Ok(Head {
                    sha: "0".repeat(40),
                    branch,
                    tag: None,
                });
            }
            Err(e) => return git(Err(e), "reading HEAD"),
        };
        let sha = head
            .target()
            .map(|o| o.to_string())
            .unwrap_or_else(|| "0".repeat(40));
        let branch = head
            .is_branch()
            .then(|| head.shorthand().ok().map(str::to_string))
            .flatten();
        let mut tag = None;
        if let Ok(oid) = git2::Oid::from_str(&sha) {
            let _ = self.repo.tag_foreach(|tag_oid, name| {
                let points_here = self
                    .repo
                    .find_object(tag_oid, None)
                    .and_then(|o| o.peel_to_commit())
                    .is_ok_and(|c| c.id() == oid);
                if points_here {
                    tag = std::str::from_utf8(name)
                        .ok()
                        .map(|n| n.trim_start_matches("refs/tags/").to_string());
                    return false;
                }
                true
            });
        }
        Ok(Head { sha, branch, tag })
    }

    /// What a commit says about itself: message, `Name <email>` of its author, and its time in
    /// seconds since the epoch. None for a sha that is not a commit here.
    pub fn commit_meta(&self, sha: &str) -> Option<(String, String, i64)> {
        let oid = git2::Oid::from_str(sha).ok()?;
        let c = self.repo.find_commit(oid).ok()?;
        let author = c.author();
        Some((
            String::from_utf8_lossy(c.message_bytes()).to_string(),
            format!(
                "{} <{}>",
                String::from_utf8_lossy(author.name_bytes()),
                String::from_utf8_lossy(author.email_bytes())
            ),
            c.time().seconds(),
        ))
    }

    /// The commit a tag points at, if the tag exists here.
    pub fn tag_commit(&self, tag: &str) -> Option<String> {
        let r = self.repo.find_reference(&format!("refs/tags/{tag}")).ok()?;
        let c = r.peel_to_commit().ok()?;
        Some(c.id().to_string())
    }

    /// Write the files of commit `sha` into `dest` (not a checkout: no `.git`), with their
    /// executable bits and symlinks; returns their paths. What a tag pipeline builds, whatever
    /// the working tree holds.
    pub fn export_commit(&self, sha: &str, dest: &Path) -> Result<Vec<String>, RepoError> {
        let oid = git(git2::Oid::from_str(sha), "commit id")?;
        let commit = git(self.repo.find_commit(oid), &format!("commit {sha}"))?;
        let tree = git(commit.tree(), "reading the commit's tree")?;
        let mut files = Vec::new();
        let mut failure: Option<RepoError> = None;
        let walked = tree.walk(git2::TreeWalkMode::PreOrder, |dir, entry| {
            let Ok(name) = entry.name() else {
                return git2::TreeWalkResult::Skip;
            };
            let rel = format!("{dir}{name}");
            let path = dest.join(&rel);
            let result = (|| -> std::io::Result<()> {
                match entry.kind() {
                    Some(git2::ObjectType::Tree) => std::fs::create_dir_all(&path),
                    Some(git2::ObjectType::Blob) => {
                        let blob = self
                            .repo
                            .find_blob(entry.id())
                            .map_err(std::io::Error::other)?;
                        if let Some(parent) = path.parent() {
                            std::fs::create_dir_all(parent)?;
                        }
                        if entry.filemode() == 0o120000 {
                            let target = String::from_utf8_lossy(blob.content()).to_string();
                            std::os::unix::fs::symlink(target, &path)?;
                        } else {
                            std::fs::write(&path, blob.content())?;
                            if entry.filemode() == 0o100755 {
                                use std::os::unix::fs::PermissionsExt;
                                std::fs::set_permissions(
                                    &path,
                                    std::fs::Permissions::from_mode(0o755),
                                )?;
                            }
                        }
                        files.push(rel);
                        Ok(())
                    }
                    // Submodules (commits) are not part of the export.
                    _ => Ok(()),
                }
            })();
            match result {
                Ok(()) => git2::TreeWalkResult::Ok,
                Err(e) => {
                    failure = Some(RepoError::Copy {
                        path: path.clone(),
                        source: e,
                    });
                    git2::TreeWalkResult::Abort
                }
            }
        });
        if let Some(e) = failure {
            return Err(e);
        }
        git(walked, "walking the commit's tree")?;
        files.sort();
        Ok(files)
    }

    /// Files git tracks (in the index) that exist in the working tree: what `include: local`
    /// may read. Untracked files are not part of the commit and never change the pipeline.
    pub fn tracked_files(&self) -> Result<Vec<String>, RepoError> {
        Ok(self.listing()?.tracked)
    }

    /// The remote's default branch (`origin/HEAD`), else `main` or `master` if one exists.
    pub fn default_branch(&self) -> String {
        if let Ok(r) = self.repo.find_reference("refs/remotes/origin/HEAD")
            && let Ok(Some(t)) = r.symbolic_target()
        {
            return t.trim_start_matches("refs/remotes/origin/").to_string();
        }
        for b in ["main", "master"] {
            if self.repo.find_branch(b, git2::BranchType::Local).is_ok() {
                return b.to_string();
            }
        }
        "main".to_string()
    }

    /// `namespace/name` from the `origin` URL, else `local/<directory name>`.
    /// The `origin` remote's URL, if there is one.
    pub fn origin_url(&self) -> Option<String> {
        self.repo
            .find_remote("origin")
            .ok()
            .and_then(|r| r.url().ok().map(str::to_string))
    }

    pub fn project_path(&self) -> (String, String) {
        let dir_name = self
            .root
            .file_name()
            .map(|n| n.to_string_lossy().to_string())
            .unwrap_or_else(|| "project".into());
        let url = self
            .repo
            .find_remote("origin")
            .ok()
            .and_then(|r| r.url().ok().map(str::to_string));
        if let Some(url) = url {
            let path = url
                .trim_end_matches('/')
                .trim_end_matches(".git")
                .rsplit(['/', ':'])
                .take(2)
                .collect::<Vec<_>>();
            if let [name, ns] = path.as_slice()
                && !name.is_empty()
                && !ns.is_empty()
            {
                return (ns.to_string(), name.to_string());
            }
        }
        ("local".into(), dir_name)
    }

    /// Files of the working copy a job sees: tracked files that still exist, plus untracked
    /// files that are not ignored. Paths are relative, with `/` separators, sorted.
    pub fn files(&self) -> Result<Vec<String>, RepoError> {
        Ok(self.listing()?.files)
    }

    /// [`Repo::files`], and the blob id of every tracked file whose working copy is the
    /// index's (git's own stat checks, racy entries re-hashed): content known without reading
    /// the file, so a snapshot can tell it is unchanged.
    pub fn files_and_ids(
        &self,
    ) -> Result<(Vec<String>, std::collections::HashMap<String, String>), RepoError> {
        let l = self.listing()?;
        Ok((l.files, l.ids))
    }

    /// Everything rave reads from the working tree's status, in one pass over it (a
    /// repository of 20,000 files pays for one walk, not three).
    pub fn listing(&self) -> Result<Listing, RepoError> {
        let index = git(self.repo.index(), "reading the index")?;
        let mut opts = StatusOptions::new();
        // Only the working tree against the index: what is staged is read from the index
        // below, so comparing HEAD's tree with the index (every tree object) is not needed.
        opts.show(git2::StatusShow::Workdir)
            .include_untracked(true)
            .recurse_untracked_dirs(true)
            .include_ignored(false)
            .exclude_submodules(true);
        let statuses = git(self.repo.statuses(Some(&mut opts)), "reading status")?;
        let mut dirty = std::collections::HashSet::new();
        let mut deleted = std::collections::HashSet::new();
        let mut files: Vec<String> = Vec::new();
        for s in statuses.iter() {
            let Ok(p) = s.path() else { continue };
            let st = s.status();
            if st.contains(Status::WT_NEW) {
                files.push(p.to_string());
            }
            if st.contains(Status::WT_DELETED) {
                deleted.insert(p.to_string());
            }
            if st.intersects(
                Status::WT_MODIFIED
                    | Status::WT_DELETED
                    | Status::WT_TYPECHANGE
                    | Status::WT_RENAMED,
            ) {
                dirty.insert(p.to_string());
            }
        }
        let mut ids = std::collections::HashMap::new();
        let mut tracked = Vec::new();
        for e in index.iter() {
            let Ok(path) = String::from_utf8(e.path) else {
                continue;
            };
            if deleted.contains(&path) {
                continue;
            }
            // Gitlinks (submodules) have no content here.
            if e.mode == 0o160000 {
                continue;
            }
            if !dirty.contains(&path) {
                ids.insert(path.clone(), format!("{}:{:o}", e.id, e.mode));
            }
            tracked.push(path.clone());
            files.push(path);
        }
        files.sort();
        files.dedup();
        tracked.sort();
        tracked.dedup();
        Ok(Listing {
            tracked,
            files,
            ids,
        })
    }

    /// Files that differ between `base` (any revision git understands) and the working tree.
    pub fn changed_since(&self, base: &str) -> Result<Vec<String>, RepoError> {
        let obj = git(
            self.repo.revparse_single(base),
            &format!("resolving `{base}`"),
        )?;
        let tree = git(obj.peel_to_tree(), &format!("reading the tree of `{base}`"))?;
        let mut opts = git2::DiffOptions::new();
        opts.include_untracked(true).recurse_untracked_dirs(true);
        let diff = git(
            self.repo
                .diff_tree_to_workdir_with_index(Some(&tree), Some(&mut opts)),
            "computing changes",
        )?;
        let mut out: Vec<String> = diff
            .deltas()
            .flat_map(|d| [d.old_file().path(), d.new_file().path()])
            .flatten()
            .map(|p| p.to_string_lossy().replace('\\', "/"))
            .collect();
        out.sort();
        out.dedup();
        Ok(out)
    }

    /// Copy `files` (as returned by [`Repo::files`]) into `dest`, keeping symlinks as symlinks.
    pub fn copy_files(&self, files: &[String], dest: &Path) -> Result<(), RepoError> {
        copy_tree(&self.root, files, dest)
    }
}

/// Copy listed relative paths from `src` to `dest`.
pub fn copy_tree(src: &Path, files: &[String], dest: &Path) -> Result<(), RepoError> {
    let err = |path: &Path| {
        let path = path.to_path_buf();
        move |source| RepoError::Copy { path, source }
    };
    for f in files {
        let from = src.join(f);
        let to = dest.join(f);
        if let Some(parent) = to.parent() {
            std::fs::create_dir_all(parent).map_err(err(parent))?;
        }
        let meta = from.symlink_metadata().map_err(err(&from))?;
        if meta.file_type().is_symlink() {
            let target = std::fs::read_link(&from).map_err(err(&from))?;
            std::os::unix::fs::symlink(target, &to).map_err(err(&to))?;
        } else if meta.is_file() {
            std::fs::copy(&from, &to).map_err(err(&from))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    fn sh(dir: &Path, cmd: &str) {
        let ok = Command::new("sh")
            .arg("-c")
            .arg(cmd)
            .current_dir(dir)
            .env("GIT_AUTHOR_NAME", "t")
            .env("GIT_AUTHOR_EMAIL", "t@example.com")
            .env("GIT_COMMITTER_NAME", "t")
            .env("GIT_COMMITTER_EMAIL", "t@example.com")
            .status()
            .unwrap()
            .success();
        assert!(ok, "{cmd}");
    }

    #[test]
    fn reads_head_files_and_changes_of_a_real_repository() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path();
        sh(
            p,
            "git init -q -b main . && echo a > a.txt && mkdir src && echo b > src/b.rs && echo 'ignored/' > .gitignore && git add -A && git commit -qm one && git tag v1",
        );
        sh(
            p,
            "mkdir ignored && echo x > ignored/x && echo new > new.txt && echo c > src/b.rs",
        );
        let r = Repo::discover(&p.join("src")).unwrap();
        let h = r.head().unwrap();
        assert_eq!(h.branch.as_deref(), Some("main"));
        assert_eq!(h.tag.as_deref(), Some("v1"));
        assert_eq!(h.sha.len(), 40);
        assert_eq!(
            r.files().unwrap(),
            [".gitignore", "a.txt", "new.txt", "src/b.rs"]
        );
        assert_eq!(r.changed_since("HEAD").unwrap(), ["new.txt", "src/b.rs"]);
        assert_eq!(r.default_branch(), "main");
        let out = tempfile::tempdir().unwrap();
        r.copy_files(&r.files().unwrap(), out.path()).unwrap();
        assert_eq!(
            std::fs::read_to_string(out.path().join("src/b.rs")).unwrap(),
            "c\n"
        );
        assert!(!out.path().join("ignored").exists());
    }

    #[test]
    fn not_a_repository_is_a_clear_error() {
        let d = tempfile::tempdir().unwrap();
        let e = Repo::discover(d.path()).err().unwrap();
        assert!(e.to_string().contains("not inside a git repository"));
    }
}

/// How to authenticate a fetch: nothing (a local path or a public URL), a token over HTTPS,
/// or an SSH private key.
#[derive(Clone, Debug, Default)]
pub enum Credentials {
    #[default]
    None,
    /// Sent as the password over HTTPS (GitLab/Gitea/GitHub personal or deploy tokens); the
    /// user name is `oauth2` unless the URL carries one.
    Token(String),
    /// A private key; `known_hosts` (OpenSSH format) pins the server's host key, else the
    /// user's `~/.ssh/known_hosts` decides, as for `git`.
    SshKey {
        key: PathBuf,
        known_hosts: Option<PathBuf>,
    },
}

/// Host-key blobs for `host` (`[host]:port` for a non-default port) in a known_hosts text.
fn known_host_keys(text: &str, host: &str, port: Option<u16>) -> Vec<Vec<u8>> {
    use base64::Engine;
    let names: Vec<String> = match port {
        Some(p) if p != 22 => vec![format!("[{host}]:{p}")],
        _ => vec![host.to_string()],
    };
    text.lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let hosts = f.next()?;
            let _kind = f.next()?;
            let key = f.next()?;
            hosts
                .split(',')
                .any(|h| names.iter().any(|n| n == h))
                .then(|| base64::engine::general_purpose::STANDARD.decode(key).ok())
                .flatten()
        })
        .collect()
}

/// Fetch every branch and tag of `url` into the bare mirror `mirror` (made on first use). The
/// mirror keeps objects between pipelines, so later fetches move only what is new.
pub fn fetch_mirror(url: &str, creds: &Credentials, mirror: &Path) -> Result<(), RepoError> {
    let repo = match Repository::open_bare(mirror) {
        Ok(r) => r,
        Err(_) => git(Repository::init_bare(mirror), "create the mirror")?,
    };
    let mut cb = git2::RemoteCallbacks::new();
    if let Credentials::SshKey {
        known_hosts: Some(kh),
        ..
    } = creds
    {
        let text = std::fs::read_to_string(kh).map_err(|e| RepoError::Git {
            context: format!("cannot read {}", kh.display()),
            source: git2::Error::from_str(&e.to_string()),
        })?;
        let (host, port) = ssh_host_port(url);
        let pinned = known_host_keys(&text, &host, port);
        let kh = kh.clone();
        cb.certificate_check(move |cert, _| {
            let Some(key) = cert.as_hostkey().and_then(|h| h.hostkey()) else {
                // Not SSH (an HTTPS certificate): the system's CA store decides.
                return Ok(git2::CertificateCheckStatus::CertificatePassthrough);
            };
            if pinned.iter().any(|p| p.as_slice() == key) {
                Ok(git2::CertificateCheckStatus::CertificateOk)
            } else {
                Err(git2::Error::from_str(&format!(
                    "the SSH host key of {host} is not the one pinned in {}",
                    kh.display()
                )))
            }
        });
    }
    let cb_creds = creds.clone();
    let mut tries = 0;
    cb.credentials(move |_url, user, allowed| {
        // libgit2 asks again after a refusal; a second ask means these credentials failed.
        tries += 1;
        if tries > 1 {
            return Err(git2::Error::from_str(
                "the configured credentials were refused",
            ));
        }
        match &cb_creds {
            Credentials::Token(t)
                if allowed.contains(git2::CredentialType::USER_PASS_PLAINTEXT) =>
            {
                git2::Cred::userpass_plaintext(user.unwrap_or("oauth2"), t)
            }
            Credentials::SshKey { key, .. } if allowed.contains(git2::CredentialType::SSH_KEY) => {
                git2::Cred::ssh_key(user.unwrap_or("git"), None, key, None)
            }
            _ => Err(git2::Error::from_str(
                "the remote asks for credentials and none are configured for this project",
            )),
        }
    });
    let mut fo = git2::FetchOptions::new();
    fo.remote_callbacks(cb);
    let mut remote = git(repo.remote_anonymous(url), "open the remote")?;
    let fetched = remote.fetch(
        &[
            "+refs/heads/*:refs/heads/*",
            "+refs/tags/*:refs/tags/*",
            // The remote's default branch, for includes that name no ref.
            "+HEAD:refs/rave/remote-head",
        ],
        Some(&mut fo),
        None,
    );
    if let Err(e) = &fetched
        && e.class() == git2::ErrorClass::Ssh
        && e.message().contains("hostkey")
    {
        let (host, port) = ssh_host_port(url);
        let context = match creds {
            Credentials::SshKey {
                known_hosts: Some(kh),
                ..
            } => format!(
                "fetch {url}: the SSH host key of {host} is not the one pinned in {} (the server changed its key, or this is not the server)",
                kh.display()
            ),
            _ => {
                let p = port.map(|p| format!("-p {p} ")).unwrap_or_default();
                format!(
                    "fetch {url}: the server's SSH host key is not known; pin it with the project's `ssh_known_hosts` (ssh-keyscan {p}{host} > known_hosts) or add it to ~/.ssh/known_hosts"
                )
            }
        };
        return Err(RepoError::Git {
            context,
            source: git2::Error::from_str(e.message()),
        });
    }
    git(fetched, &format!("fetch {url}"))?;
    Ok(())
}

/// Host and port of an SSH URL (`ssh://user@host:port/path` or scp-like `user@host:path`).
fn ssh_host_port(url: &str) -> (String, Option<u16>) {
    let rest = url.strip_prefix("ssh://").unwrap_or(url);
    let rest = rest.split_once('@').map_or(rest, |(_, r)| r);
    if url.starts_with("ssh://") {
        let hostport = rest.split('/').next().unwrap_or(rest);
        match hostport.rsplit_once(':') {
            Some((h, p)) => (h.to_string(), p.parse().ok()),
            None => (hostport.to_string(), None),
        }
    } else {
        (rest.split(':').next().unwrap_or(rest).to_string(), None)
    }
}

/// The commit a branch or tag names in the mirror.
/// The commit `reference` names in a mirror: a full commit id, a branch or a tag; None is the
/// default branch (the remote's HEAD when fetched, else `main`, else `master`).
pub fn mirror_resolve(mirror: &Path, reference: Option<&str>) -> Result<String, RepoError> {
    let repo = git(Repository::open_bare(mirror), "open the mirror")?;
    let candidates: Vec<String> = match reference {
        Some(r) if r.len() == 40 && r.bytes().all(|b| b.is_ascii_hexdigit()) => {
            let oid = git(git2::Oid::from_str(r), "commit id")?;
            git(
                repo.find_commit(oid),
                &format!("commit {r} is not in the repository"),
            )?;
            return Ok(r.to_string());
        }
        Some(r) => vec![format!("refs/heads/{r}"), format!("refs/tags/{r}")],
        None => vec![
            "refs/rave/remote-head".into(),
            "refs/heads/main".into(),
            "refs/heads/master".into(),
        ],
    };
    for c in &candidates {
        if let Ok(r) = repo.find_reference(c)
            && let Ok(commit) = r.peel_to_commit()
        {
            return Ok(commit.id().to_string());
        }
    }
    Err(RepoError::Git {
        context: match reference {
            Some(r) => format!("no branch, tag or commit `{r}`"),
            None => "no default branch (main or master)".into(),
        },
        source: git2::Error::from_str("not found"),
    })
}

/// Tags of a mirror with the commits they point at.
pub fn mirror_tags(mirror: &Path) -> Result<Vec<(String, String)>, RepoError> {
    let repo = git(Repository::open_bare(mirror), "open the mirror")?;
    let names = git(repo.tag_names(None), "list tags")?;
    let mut out = Vec::new();
    for name in names.iter().flatten().flatten() {
        if let Ok(r) = repo.find_reference(&format!("refs/tags/{name}"))
            && let Ok(c) = r.peel_to_commit()
        {
            out.push((name.to_string(), c.id().to_string()));
        }
    }
    Ok(out)
}

/// A file's text at a commit of a mirror; None when the commit has no such file.
pub fn mirror_file(mirror: &Path, sha: &str, path: &str) -> Result<Option<String>, RepoError> {
    let repo = git(Repository::open_bare(mirror), "open the mirror")?;
    let oid = git(git2::Oid::from_str(sha), "commit id")?;
    let commit = git(repo.find_commit(oid), &format!("commit {sha}"))?;
    let tree = git(commit.tree(), "the commit's tree")?;
    let Ok(entry) = tree.get_path(Path::new(path)) else {
        return Ok(None);
    };
    let Ok(blob) = repo.find_blob(entry.id()) else {
        return Ok(None);
    };
    Ok(Some(String::from_utf8_lossy(blob.content()).into_owned()))
}

pub fn resolve_in_mirror(mirror: &Path, name: &str, tag: bool) -> Result<String, RepoError> {
    let repo = git(Repository::open_bare(mirror), "open the mirror")?;
    let full = if tag {
        format!("refs/tags/{name}")
    } else {
        format!("refs/heads/{name}")
    };
    let r = git(repo.find_reference(&full), &format!("no {full}"))?;
    let c = git(r.peel_to_commit(), &format!("{full} is not a commit"))?;
    Ok(c.id().to_string())
}

/// Is `sha` a commit in the mirror?
pub fn mirror_has(mirror: &Path, sha: &str) -> Result<(), RepoError> {
    let repo = git(Repository::open_bare(mirror), "open the mirror")?;
    let oid = git(
        git2::Oid::from_str(sha),
        &format!("`{sha}` is not a commit id"),
    )?;
    git(
        repo.find_commit(oid),
        &format!("commit {sha} is not in the repository (was it force-pushed away?)"),
    )?;
    Ok(())
}

/// A working tree at exactly `sha` (detached), cloned from the mirror: what the branch points
/// to by now does not matter. `branch` becomes a local branch at that commit so tools that
/// ask git for the branch see the pushed one.
pub fn checkout_commit(
    mirror: &Path,
    sha: &str,
    dest: &Path,
    branch: Option<&str>,
) -> Result<(), RepoError> {
    let url = mirror.to_string_lossy();
    let repo = git(
        git2::build::RepoBuilder::new()
            .bare(false)
            .with_checkout(git2::build::CheckoutBuilder::new())
            .clone(&url, dest),
        "clone the mirror",
    )?;
    let oid = git(git2::Oid::from_str(sha), "commit id")?;
    let commit = git(repo.find_commit(oid), &format!("commit {sha}"))?;
    git(
        repo.checkout_tree(
            commit.as_object(),
            Some(git2::build::CheckoutBuilder::new().force()),
        ),
        "check out",
    )?;
    // Detach first: the clone may have checked out `branch` already, and a branch that is
    // HEAD cannot be moved.
    git(repo.set_head_detached(oid), "set HEAD")?;
    if let Some(b) = branch {
        git(repo.branch(b, &commit, true), &format!("branch {b}"))?;
        git(repo.set_head(&format!("refs/heads/{b}")), "set HEAD")?;
    }
    Ok(())
}

#[cfg(test)]
mod ssh_tests {
    use super::*;

    #[test]
    fn ssh_urls_and_known_hosts() {
        assert_eq!(
            ssh_host_port("ssh://git@example.com:2222/g/app.git"),
            ("example.com".into(), Some(2222))
        );
        assert_eq!(
            ssh_host_port("git@example.com:g/app.git"),
            ("example.com".into(), None)
        );
        let kh = "# c\n[127.0.0.1]:2222 ssh-ed25519 AAAAC3NzaC1lZDI1NTE5\nexample.com,10.0.0.1 ssh-ed25519 AAAA\n";
        assert_eq!(known_host_keys(kh, "127.0.0.1", Some(2222)).len(), 1);
        assert_eq!(known_host_keys(kh, "127.0.0.1", None).len(), 0);
        assert_eq!(known_host_keys(kh, "example.com", Some(22)).len(), 1);
    }
}

/// A submodule of a commit: its `.gitmodules` entry and the commit its gitlink records.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Submodule {
    pub name: String,
    pub path: String,
    pub url: String,
    pub commit: String,
}

/// The submodules of `commit` in the repository at `repo_dir` (a working tree or a bare
/// mirror): every gitlink of its tree with the `.gitmodules` entry of the same path.
pub fn submodules_at(repo_dir: &Path, commit: &str) -> Result<Vec<Submodule>, RepoError> {
    let repo = git(Repository::open(repo_dir), "open the repository")?;
    let tree = commit_tree(&repo, commit)?;
    // `.gitmodules`: [submodule "name"] sections with path and url. Without it a gitlink
    // names no submodule git could check out, and the tree need not be walked (a walk of a
    // 20,000-file tree costs tens of milliseconds).
    let mut entries: Vec<(String, String, String)> = Vec::new();
    let Ok(modules) = tree.get_path(Path::new(".gitmodules")) else {
        return Ok(Vec::new());
    };
    if let Ok(blob) = repo.find_blob(modules.id()) {
        let text = String::from_utf8_lossy(blob.content()).into_owned();
        let mut current: Option<(String, String, String)> = None;
        for line in text.lines().map(str::trim) {
            if let Some(rest) = line.strip_prefix("[submodule") {
                if let Some(c) = current.take() {
                    entries.push(c);
                }
                let name = rest.trim().trim_end_matches(']').trim().trim_matches('"');
                current = Some((name.to_string(), String::new(), String::new()));
            } else if let Some((k, v)) = line.split_once('=')
                && let Some(c) = current.as_mut()
            {
                match k.trim() {
                    "path" => c.1 = v.trim().to_string(),
                    "url" => c.2 = v.trim().to_string(),
                    _ => {}
                }
            }
        }
        if let Some(c) = current.take() {
            entries.push(c);
        }
    }
    let mut out = Vec::new();
    git(
        tree.walk(git2::TreeWalkMode::PreOrder, |dir, e| {
            if e.kind() == Some(git2::ObjectType::Commit) {
                let path = format!("{dir}{}", e.name().unwrap_or_default());
                if let Some((name, _, url)) = entries.iter().find(|(_, p, _)| *p == path) {
                    out.push(Submodule {
                        name: name.clone(),
                        path,
                        url: url.clone(),
                        commit: e.id().to_string(),
                    });
                }
            }
            git2::TreeWalkResult::Ok
        }),
        "walk the tree",
    )?;
    Ok(out)
}

/// The tree of `commit` in `repo`.
fn commit_tree<'r>(repo: &'r Repository, commit: &str) -> Result<git2::Tree<'r>, RepoError> {
    let oid = git(git2::Oid::from_str(commit), "commit id")?;
    git(
        git(repo.find_commit(oid), &format!("commit {commit}"))?.tree(),
        "the commit's tree",
    )
}

/// Does the repository at `repo_dir` hold `commit`?
pub fn has_commit(repo_dir: &Path, commit: &str) -> bool {
    let Ok(repo) = Repository::open(repo_dir) else {
        return false;
    };
    git2::Oid::from_str(commit).is_ok_and(|oid| repo.find_commit(oid).is_ok())
}

/// Write the files of `commit` (from the repository at `repo_dir`) into `dest`: blobs with
/// their executable bit, symlinks as symlinks, gitlinks as empty directories.
pub fn write_tree(repo_dir: &Path, commit: &str, dest: &Path) -> Result<usize, RepoError> {
    use std::os::unix::fs::PermissionsExt;
    let repo = git(Repository::open(repo_dir), "open the repository")?;
    let tree = commit_tree(&repo, commit)?;
    let io = |e: std::io::Error, p: &Path| RepoError::Git {
        context: format!("write {}", p.display()),
        source: git2::Error::from_str(&e.to_string()),
    };
    std::fs::create_dir_all(dest).map_err(|e| io(e, dest))?;
    let mut written = 0;
    let mut failed = None;
    git(
        tree.walk(git2::TreeWalkMode::PreOrder, |dir, e| {
            let path = dest.join(dir).join(e.name().unwrap_or_default());
            let r: Result<(), std::io::Error> = match e.kind() {
                Some(git2::ObjectType::Tree) | Some(git2::ObjectType::Commit) => {
                    std::fs::create_dir_all(&path)
                }
                Some(git2::ObjectType::Blob) => match repo.find_blob(e.id()) {
                    Ok(blob) if e.filemode() == 0o120000 => {
                        let target = String::from_utf8_lossy(blob.content()).into_owned();
                        let _ = std::fs::remove_file(&path);
                        std::os::unix::fs::symlink(target, &path)
                    }
                    Ok(blob) => std::fs::write(&path, blob.content()).and_then(|()| {
                        let mode = if e.filemode() == 0o100755 {
                            0o755
                        } else {
                            0o644
                        };
                        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode))
                    }),
                    Err(err) => Err(std::io::Error::other(err.to_string())),
                },
                _ => Ok(()),
            };
            match r {
                Ok(()) => {
                    written += 1;
                    git2::TreeWalkResult::Ok
                }
                Err(err) => {
                    failed = Some(io(err, &path));
                    git2::TreeWalkResult::Abort
                }
            }
        }),
        "walk the tree",
    )
    .map_err(|e| failed.take().unwrap_or(e))?;
    if let Some(f) = failed {
        return Err(f);
    }
    Ok(written)
}

/// Point the checkout at `dir`'s `origin` to `url`, without any password it carries (jobs
/// read their `.git/config`): what `git remote get-url origin` and relative submodule URLs
/// see in a server's checkout, instead of the server's own mirror.
pub fn set_origin(dir: &Path, url: &str) -> Result<(), RepoError> {
    let repo = git(Repository::open(dir), "open the checkout")?;
    git(
        repo.remote_set_url("origin", &without_password(url)),
        "set origin",
    )
}

/// `https://user:secret@host/p.git` → `https://user@host/p.git`; other URLs as they are.
pub fn without_password(url: &str) -> String {
    if let Some((scheme, rest)) = url.split_once("://")
        && let Some((userinfo, host)) = rest.split_once('@')
        && !userinfo.contains('/')
    {
        let user = userinfo.split(':').next().unwrap_or_default();
        return format!("{scheme}://{user}@{host}");
    }
    url.to_string()
}

#[cfg(test)]
mod url_tests {
    use super::without_password;

    #[test]
    fn passwords_are_dropped_from_urls() {
        assert_eq!(
            without_password("https://oauth2:glpat-secret@gitlab.example.com/g/app.git"),
            "https://oauth2@gitlab.example.com/g/app.git"
        );
        assert_eq!(
            without_password("ssh://git@host:2222/g/app.git"),
            "ssh://git@host:2222/g/app.git"
        );
        assert_eq!(without_password("/srv/git/app.git"), "/srv/git/app.git");
        assert_eq!(
            without_password("https://host/a@b/app.git"),
            "https://host/a@b/app.git"
        );
    }
}
