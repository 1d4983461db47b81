//! Masking secret values in job output, exactly, on a stream.
//!
//! Output arrives in chunks whose boundaries fall anywhere, so a secret may be split across two
//! chunks. Each stream keeps back its last `longest secret − 1` bytes until the next chunk (or
//! the end) shows whether they start a secret; everything before that point is final. One
//! Aho-Corasick pass (leftmost-longest, so a secret containing another is masked whole) finds
//! every secret at once.

use aho_corasick::{AhoCorasick, AhoCorasickBuilder, MatchKind};

pub const REPLACEMENT: &[u8] = b"[MASKED]";

/// GitLab's rule: only values of 8 characters or more are masked (shorter ones would blot out
/// ordinary words). Multi-line values (keys) are masked line by line.
pub fn mask_values<'a>(values: impl IntoIterator<Item = &'a str>) -> Vec<Vec<u8>> {
    let mut out: Vec<Vec<u8>> = values
        .into_iter()
        .flat_map(|v| {
            v.lines()
                .map(str::trim)
                .filter(|l| l.len() >= 8)
                .map(|l| l.as_bytes().to_vec())
                .collect::<Vec<_>>()
        })
        .collect();
    out.sort_by_key(|v| std::cmp::Reverse(v.len()));
    out.dedup();
    out
}

/// The secrets to mask, compiled once per run.
#[derive(Clone, Debug, Default)]
pub struct Masker {
    ac: Option<AhoCorasick>,
    /// Bytes a stream keeps back: the longest secret's length minus one.
    hold: usize,
}

/// What one stream has kept back.
#[derive(Clone, Debug, Default)]
pub struct Pending(Vec<u8>);

impl Masker {
    pub fn new(secrets: &[Vec<u8>]) -> Masker {
        let secrets: Vec<&Vec<u8>> = secrets.iter().filter(|s| !s.is_empty()).collect();
        if secrets.is_empty() {
            return Masker::default();
        }
        let hold = secrets.iter().map(|s| s.len()).max().unwrap_or(1) - 1;
        let ac = AhoCorasickBuilder::new()
            .match_kind(MatchKind::LeftmostLongest)
            .build(&secrets)
            .ok();
        Masker { ac, hold }
    }

    pub fn is_empty(&self) -> bool {
        self.ac.is_none()
    }

    /// Feed a chunk; returns the masked bytes that are final now.
    pub fn feed(&self, pending: &mut Pending, data: &[u8]) -> Vec<u8> {
        let Some(ac) = &self.ac else {
            return data.to_vec();
        };
        let mut buf = std::mem::take(&mut pending.0);
        buf.extend_from_slice(data);
        // A secret that is not complete in `buf` starts at or after `safe`, so every match
        // that starts before it is final.
        let safe = buf.len().saturating_sub(self.hold);
        let mut out = Vec::with_capacity(buf.len());
        let mut pos = 0;
        for m in ac.find_iter(&buf) {
            if m.start() >= safe {
                break;
            }
            out.extend_from_slice(&buf[pos..m.start()]);
            out.extend_from_slice(REPLACEMENT);
            pos = m.end();
        }
        let keep_from = pos.max(safe);
        out.extend_from_slice(&buf[pos..keep_from]);
        pending.0 = buf.split_off(keep_from);
        out
    }

    /// The end of the stream: mask and return what was kept back.
    pub fn finish(&self, pending: &mut Pending) -> Vec<u8> {
        let rest = std::mem::take(&mut pending.0);
        let Some(ac) = &self.ac else {
            return rest;
        };
        let mut out = Vec::with_capacity(rest.len());
        ac.replace_all_with_bytes(&rest, &mut out, |_, _, dst| {
            dst.extend_from_slice(REPLACEMENT);
            true
        });
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stream(m: &Masker, chunks: &[&[u8]]) -> Vec<u8> {
        let mut p = Pending::default();
        let mut out = Vec::new();
        for c in chunks {
            out.extend(m.feed(&mut p, c));
        }
        out.extend(m.finish(&mut p));
        out
    }

    #[test]
    fn a_secret_is_masked_at_every_split_offset_and_chunk_size() {
        let secret = b"s3cr3t-t0ken-value";
        let m = Masker::new(&mask_values(["s3cr3t-t0ken-value", "another-secret"]));
        let text: Vec<u8> = [
            &b"line one\nthe token is "[..],
            secret,
            b" and again ",
            secret,
            secret,
            b"\nanother-secret end\n",
        ]
        .concat();
        let want = b"line one\nthe token is [MASKED] and again [MASKED][MASKED]\n[MASKED] end\n";
        for size in 1..=text.len() {
            let chunks: Vec<&[u8]> = text.chunks(size).collect();
            assert_eq!(stream(&m, &chunks), want, "chunk size {size}");
        }
        for cut in 0..=text.len() {
            let (a, b) = text.split_at(cut);
            assert_eq!(stream(&m, &[a, b]), want, "split at {cut}");
        }
    }

    #[test]
    fn the_longest_secret_wins_and_short_values_are_not_masked() {
        let m = Masker::new(&mask_values(["abcdefgh", "abcdefghijkl", "short"]));
        assert_eq!(
            stream(&m, &[b"xabcdefghijkly", b" short"]),
            b"x[MASKED]y short"
        );
        assert_eq!(stream(&m, &[b"abcdefgh", b"ij"]), b"[MASKED]ij");
    }

    #[test]
    fn multi_line_values_are_masked_line_by_line() {
        let m = Masker::new(&mask_values([
            "-----BEGIN KEY-----\nb3BlbnNzaC1rZXktdjEAAAAA\n-----END KEY-----",
        ]));
        assert_eq!(
            stream(&m, &[b"key b3BlbnNzaC1", b"rZXktdjEAAAAA short\n"]),
            b"key [MASKED] short\n"
        );
    }

    #[test]
    fn nothing_to_mask_passes_through_without_holding() {
        let m = Masker::new(&[]);
        let mut p = Pending::default();
        assert_eq!(m.feed(&mut p, b"abc"), b"abc");
        assert!(m.finish(&mut p).is_empty());
    }
}
