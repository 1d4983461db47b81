//! rave's own secrets check: no file may contain the value of a masked variable.
//!
//! Files are read in chunks with an overlap as long as the longest value, so a value split
//! across two reads is still found and no file is ever held whole in memory.

use std::io::Read;
use std::path::Path;

use crate::finding::{Finding, Severity, Tool};

/// GitLab refuses to mask values shorter than 8 characters; so does rave (short values would
/// match everywhere).
pub const MIN_MASKED_LEN: usize = 8;

const CHUNK: usize = 256 * 1024;

/// Search every file under `dir` (not `.git`) for the values of `masked` (name, value).
pub fn scan(dir: &Path, masked: &[(String, String)]) -> Vec<Finding> {
    let masked: Vec<&(String, String)> = masked
        .iter()
        .filter(|(_, v)| v.len() >= MIN_MASKED_LEN)
        .collect();
    let mut out = Vec::new();
    if masked.is_empty() {
        return out;
    }
    let longest = masked.iter().map(|(_, v)| v.len()).max().unwrap_or(0);
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            let path = e.path();
            let Ok(ft) = e.file_type() else { continue };
            if ft.is_dir() {
                if e.file_name() != ".git" {
                    stack.push(path);
                }
                continue;
            }
            if !ft.is_file() {
                continue;
            }
            let rel = path
                .strip_prefix(dir)
                .unwrap_or(&path)
                .to_string_lossy()
                .to_string();
            for (name, line) in scan_file(&path, &masked, longest) {
                out.push(Finding {
                    tool: Tool::Secrets,
                    id: "masked-variable".into(),
                    title: format!("the value of masked variable {name} is written in this file"),
                    severity: Severity::Critical,
                    package: None,
                    installed_version: None,
                    fixed_version: None,
                    target: Some(rel.clone()),
                    line: Some(line),
                    link: None,
                });
            }
        }
    }
    out.sort_by(|a, b| (&a.target, a.line).cmp(&(&b.target, b.line)));
    out
}

/// (variable name, line) of each value found in one file, each name reported once.
fn scan_file(path: &Path, masked: &[&(String, String)], longest: usize) -> Vec<(String, u32)> {
    let Ok(mut f) = std::fs::File::open(path) else {
        return Vec::new();
    };
    let mut found: Vec<(String, u32)> = Vec::new();
    let mut buf: Vec<u8> = Vec::with_capacity(CHUNK + longest);
    // Lines before the start of `buf`.
    let mut lines_before: u32 = 0;
    let mut chunk = vec![0u8; CHUNK];
    loop {
        let n = match f.read(&mut chunk) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        buf.extend_from_slice(&chunk[..n]);
        for (name, value) in masked {
            if found.iter().any(|(n, _)| n == name) {
                continue;
            }
            if let Some(pos) = find(&buf, value.as_bytes()) {
                let line =
                    lines_before + 1 + buf[..pos].iter().filter(|b| **b == b'\n').count() as u32;
                found.push((name.clone(), line));
            }
        }
        // Keep the tail that could start a match spanning into the next read.
        let keep = longest.saturating_sub(1).min(buf.len());
        let drop = buf.len() - keep;
        lines_before += buf[..drop].iter().filter(|b| **b == b'\n').count() as u32;
        buf.drain(..drop);
    }
    found
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_values_across_chunk_boundaries_and_skips_short_ones() {
        let d = tempfile::tempdir().unwrap();
        let secret = "s3cr3t-v4lue-xyz";
        let mut big = "x".repeat(CHUNK - 5);
        big.push_str(secret);
        big.push_str("\nmore\n");
        std::fs::write(d.path().join("big.txt"), format!("line1\n{big}")).unwrap();
        std::fs::write(d.path().join("clean.txt"), "nothing here").unwrap();
        std::fs::create_dir(d.path().join(".git")).unwrap();
        std::fs::write(d.path().join(".git/config"), secret).unwrap();
        std::fs::write(d.path().join("short.txt"), "abc").unwrap();
        let f = scan(
            d.path(),
            &[
                ("TOKEN".into(), secret.into()),
                ("SHORT".into(), "abc".into()),
            ],
        );
        assert_eq!(f.len(), 1, "{f:?}");
        assert_eq!(f[0].target.as_deref(), Some("big.txt"));
        assert_eq!(f[0].line, Some(2));
        assert!(f[0].title.contains("TOKEN"));
        assert!(
            !f[0].title.contains(secret),
            "the finding must not repeat the secret"
        );
    }
}
