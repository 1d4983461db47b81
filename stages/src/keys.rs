//! Release signing keys: Ed25519 in OpenSSH format, so `ssh-keygen -Y verify` checks what
//! rave signs without trusting rave.

use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use ssh_key::{Algorithm, HashAlg, LineEnding, PrivateKey, PublicKey, SshSig};

use crate::ReleaseError;

/// The SSHSIG namespace of release signatures (`ssh-keygen -Y verify -n rave-release`).
pub const NAMESPACE: &str = "rave-release";
/// The principal written in allowed_signers files rave produces.
pub const PRINCIPAL: &str = "rave-release";
const KEY_FILE: &str = "rave-release";

/// The private key, with its id. Debug never shows the key.
pub struct SigningKey {
    key: PrivateKey,
}

impl std::fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SigningKey({} [masked])", self.id())
    }
}

impl SigningKey {
    pub fn generate() -> Result<SigningKey, ReleaseError> {
        let key = PrivateKey::random(&mut rand_core::OsRng, Algorithm::Ed25519)
            .map_err(|e| ReleaseError::Key(format!("cannot generate a key: {e}")))?;
        Ok(SigningKey { key })
    }

    /// `SHA256:…`, as `ssh-keygen -l` prints it.
    pub fn id(&self) -> String {
        self.key
            .public_key()
            .fingerprint(HashAlg::Sha256)
            .to_string()
    }

    pub fn public(&self) -> PublicKey {
        self.key.public_key().clone()
    }

    pub fn sign(&self, msg: &[u8]) -> Result<String, ReleaseError> {
        let sig = self
            .key
            .sign(NAMESPACE, HashAlg::Sha512, msg)
            .map_err(|e| ReleaseError::Key(format!("signing failed: {e}")))?;
        sig.to_pem(LineEnding::LF)
            .map_err(|e| ReleaseError::Key(e.to_string()))
    }

    /// Read a key from a file, which must not be readable by group or others.
    pub fn from_file(path: &Path) -> Result<SigningKey, ReleaseError> {
        let meta = std::fs::metadata(path)
            .map_err(|e| ReleaseError::Key(format!("cannot read {}: {e}", path.display())))?;
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(ReleaseError::Key(format!(
                "{} is readable by others (mode {mode:o}); run `chmod 600 {}`",
                path.display(),
                path.display()
            )));
        }
        let text = std::fs::read_to_string(path)
            .map_err(|e| ReleaseError::Key(format!("cannot read {}: {e}", path.display())))?;
        Self::from_openssh(&text, &path.display().to_string())
    }

    /// Parse an OpenSSH private key (e.g. from RAVE_SIGNING_KEY). Errors never quote the key.
    pub fn from_openssh(text: &str, origin: &str) -> Result<SigningKey, ReleaseError> {
        let key = PrivateKey::from_openssh(text.trim()).map_err(|_| {
            ReleaseError::Key(format!("{origin} does not hold an OpenSSH private key"))
        })?;
        if key.algorithm() != Algorithm::Ed25519 {
            return Err(ReleaseError::Key(format!("{origin} is not an Ed25519 key")));
        }
        if key.is_encrypted() {
            return Err(ReleaseError::Key(format!(
                "{origin} is encrypted; rave needs an unencrypted key for unattended signing"
            )));
        }
        Ok(SigningKey { key })
    }

    /// Write `dir/rave-release` (0600) and `dir/rave-release.pub`.
    pub fn save(&self, dir: &Path) -> Result<PathBuf, ReleaseError> {
        std::fs::create_dir_all(dir)
            .map_err(|e| ReleaseError::Key(format!("cannot create {}: {e}", dir.display())))?;
        let path = dir.join(KEY_FILE);
        let pem = self
            .key
            .to_openssh(LineEnding::LF)
            .map_err(|e| ReleaseError::Key(e.to_string()))?;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .map_err(|e| ReleaseError::Key(format!("cannot create {}: {e}", path.display())))?;
        f.write_all(pem.as_bytes())
            .map_err(|e| ReleaseError::Key(e.to_string()))?;
        std::fs::write(
            dir.join(format!("{KEY_FILE}.pub")),
            public_line(&self.public())?,
        )
        .map_err(|e| ReleaseError::Key(e.to_string()))?;
        Ok(path)
    }
}

pub fn public_line(p: &PublicKey) -> Result<String, ReleaseError> {
    Ok(format!(
        "{}\n",
        p.to_openssh()
            .map_err(|e| ReleaseError::Key(e.to_string()))?
    ))
}

/// An allowed_signers line for `ssh-keygen -Y verify`.
pub fn allowed_signers_line(p: &PublicKey) -> Result<String, ReleaseError> {
    Ok(format!(
        "{PRINCIPAL} namespaces=\"{NAMESPACE}\" {}\n",
        p.to_openssh()
            .map_err(|e| ReleaseError::Key(e.to_string()))?
    ))
}

/// Verify an SSHSIG (PEM) over `msg` against any of `keys`. Returns the id of the key that
/// signed.
pub fn verify(msg: &[u8], sig_pem: &str, keys: &[PublicKey]) -> Result<String, ReleaseError> {
    let sig = SshSig::from_pem(sig_pem.trim()).map_err(|e| {
        ReleaseError::Signature(format!("the signature file is not an SSH signature: {e}"))
    })?;
    for k in keys {
        if k.verify(NAMESPACE, msg, &sig).is_ok() {
            return Ok(k.fingerprint(HashAlg::Sha256).to_string());
        }
    }
    Err(ReleaseError::Signature(
        "the signature does not match the manifest with any allowed key: the manifest was changed after signing, or it was signed by another key".into(),
    ))
}

/// Public keys from an allowed_signers file or a `.pub` file.
pub fn read_public_keys(path: &Path) -> Result<Vec<PublicKey>, ReleaseError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| ReleaseError::Key(format!("cannot read {}: {e}", path.display())))?;
    let mut keys = Vec::new();
    for line in text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
    {
        // allowed_signers: principals [options] keytype base64 [comment]
        let parts: Vec<&str> = line.split_whitespace().collect();
        let start = parts
            .iter()
            .position(|p| p.starts_with("ssh-") || p.starts_with("ecdsa-"));
        if let Some(i) = start
            && let Some(b64) = parts.get(i + 1)
            && let Ok(k) = PublicKey::from_openssh(&format!("{} {}", parts[i], b64))
        {
            keys.push(k);
        }
    }
    if keys.is_empty() {
        return Err(ReleaseError::Key(format!(
            "{} holds no public key",
            path.display()
        )));
    }
    Ok(keys)
}

/// Keys in a key directory: the current one and retired ones (`retired/<date>-rave-release`).
pub fn list(dir: &Path) -> Vec<(String, PathBuf, bool)> {
    let mut out = Vec::new();
    let current = dir.join(format!("{KEY_FILE}.pub"));
    if let Ok(k) = read_public_keys(&current) {
        out.push((k[0].fingerprint(HashAlg::Sha256).to_string(), current, true));
    }
    if let Ok(rd) = std::fs::read_dir(dir.join("retired")) {
        let mut retired: Vec<PathBuf> = rd
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|e| e == "pub"))
            .collect();
        retired.sort();
        for p in retired {
            if let Ok(k) = read_public_keys(&p) {
                out.push((k[0].fingerprint(HashAlg::Sha256).to_string(), p, false));
            }
        }
    }
    out
}

/// Retire the current key (kept for verifying old releases) and make a new one.
pub fn rotate(dir: &Path) -> Result<SigningKey, ReleaseError> {
    let stamp = humantime::format_rfc3339_seconds(std::time::SystemTime::now())
        .to_string()
        .replace(':', "");
    let retired = dir.join("retired");
    std::fs::create_dir_all(&retired).map_err(|e| ReleaseError::Key(e.to_string()))?;
    for (from, to) in [
        (
            dir.join(KEY_FILE),
            retired.join(format!("{stamp}-{KEY_FILE}")),
        ),
        (
            dir.join(format!("{KEY_FILE}.pub")),
            retired.join(format!("{stamp}-{KEY_FILE}.pub")),
        ),
    ] {
        if from.exists() {
            std::fs::rename(&from, &to)
                .map_err(|e| ReleaseError::Key(format!("cannot retire {}: {e}", from.display())))?;
        }
    }
    let k = SigningKey::generate()?;
    k.save(dir)?;
    Ok(k)
}
