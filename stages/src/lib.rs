//! rave's built-in stage kinds beyond plain jobs. This session: `release` (signed manifests,
//! provenance, verification) and the `keys` that sign them. Each is a library behind a `rave`
//! subcommand a job's script calls (`rave release create`, `rave release verify`, `rave keys`).

pub mod cpio;
pub mod image;
pub mod keys;
pub mod publish;
pub mod release;
pub mod vmtest;

#[derive(Debug, thiserror::Error)]
pub enum ReleaseError {
    #[error("key: {0}")]
    Key(String),
    #[error("signature: {0}")]
    Signature(String),
    #[error("artifacts do not match the manifest:\n{0}")]
    Digest(String),
    #[error("{0}")]
    Io(String),
}
