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

    /// The same Ed25519 key in minisign's form: its key id is the first 8 bytes of the SHA-256
    /// of the public key, so one key makes both signatures and either verifies.
    fn minisign_pair(&self) -> Result<(minisign::SecretKey, minisign::PublicKey), ReleaseError> {
        use sha2::Digest;
        let kp = self
            .key
            .key_data()
            .ed25519()
            .ok_or_else(|| ReleaseError::Key("not an Ed25519 key".into()))?;
        let public = kp.public.0;
        let keynum: [u8; 8] = sha2::Sha256::digest(public)[..8]
            .try_into()
            .map_err(|_| ReleaseError::Key("key id".into()))?;
        // minisign's secret key layout, unencrypted (no KDF); the checksum is only read when
        // a key is decrypted, which this one never is.
        let mut sk = Vec::with_capacity(158);
        sk.extend_from_slice(b"Ed");
        sk.extend_from_slice(&[0, 0]);
        sk.extend_from_slice(b"B2");
        sk.extend_from_slice(&[0u8; 32 + 8 + 8]);
        sk.extend_from_slice(&keynum);
        sk.extend_from_slice(&kp.private.to_bytes());
        sk.extend_from_slice(&public);
        sk.extend_from_slice(&[0u8; 32]);
        let secret = minisign::SecretKey::from_bytes(&sk)
            .map_err(|e| ReleaseError::Key(format!("minisign key: {e}")))?;
        let mut pk = Vec::with_capacity(42);
        pk.extend_from_slice(b"Ed");
        pk.extend_from_slice(&keynum);
        pk.extend_from_slice(&public);
        let public = minisign::PublicKey::from_bytes(&pk)
            .map_err(|e| ReleaseError::Key(format!("minisign key: {e}")))?;
        Ok((secret, public))
    }

    /// A minisign signature of `msg` (verifiable with `minisign -V`); `trusted` is its
    /// signed comment.
    pub fn sign_minisign(&self, msg: &[u8], trusted: &str) -> Result<String, ReleaseError> {
        let (sk, pk) = self.minisign_pair()?;
        let sig = minisign::sign(
            Some(&pk),
            &sk,
            std::io::Cursor::new(msg),
            Some(trusted),
            Some("signature from rave release"),
        )
        .map_err(|e| ReleaseError::Key(format!("minisign signing failed: {e}")))?;
        Ok(sig.into_string())
    }

    /// The public key in minisign's file format (`minisign -p`).
    pub fn minisign_public(&self) -> Result<String, ReleaseError> {
        let (_, pk) = self.minisign_pair()?;
        let id = minisign_id(pk.keynum());
        let text = pk
            .to_box()
            .map_err(|e| ReleaseError::Key(e.to_string()))?
            .into_string();
        // The box's own comment names minisign's key id; say it is rave's key too.
        Ok(text.replacen(
            "untrusted comment: ",
            &format!("untrusted comment: rave release key {} ({id}); ", self.id()),
            1,
        ))
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
        // The same key for `minisign -V` users.
        std::fs::write(
            dir.join(format!("{KEY_FILE}.minisign.pub")),
            self.minisign_public()?,
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

/// The keys a verifier trusts: OpenSSH ones (allowed_signers, `.pub`) check the SSHSIG
/// signature (`.sig`), a minisign public key checks the minisign one (`.minisig`).
pub enum Trusted {
    Ssh(Vec<PublicKey>),
    Minisign(Box<minisign::PublicKey>),
}

/// The trusted keys in `path`, whichever of the two formats it holds.
pub fn read_trusted(path: &Path) -> Result<Trusted, ReleaseError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| ReleaseError::Key(format!("cannot read {}: {e}", path.display())))?;
    if text.trim_start().starts_with("untrusted comment:") {
        let pk = minisign::PublicKeyBox::from_string(&text)
            .and_then(|b| b.into_public_key())
            .map_err(|e| {
                ReleaseError::Key(format!(
                    "{} is not a minisign public key: {e}",
                    path.display()
                ))
            })?;
        return Ok(Trusted::Minisign(Box::new(pk)));
    }
    read_public_keys(path).map(Trusted::Ssh)
}

/// A minisign key id as `minisign` prints it.
fn minisign_id(keynum: &[u8]) -> String {
    let mut n = [0u8; 8];
    n.copy_from_slice(&keynum[..8]);
    format!("minisign:{:016X}", u64::from_le_bytes(n))
}

/// Verify a minisign signature over `msg`. Returns the signing key's id.
pub fn verify_minisign(
    msg: &[u8],
    sig_text: &str,
    key: &minisign::PublicKey,
) -> Result<String, ReleaseError> {
    let sig = minisign::SignatureBox::from_string(sig_text).map_err(|e| {
        ReleaseError::Signature(format!(
            "the signature file is not a minisign signature: {e}"
        ))
    })?;
    minisign::verify(key, &sig, std::io::Cursor::new(msg), true, false, false).map_err(|_| {
        ReleaseError::Signature(
            "the minisign signature does not match the manifest with the trusted key: the manifest was changed after signing, or it was signed by another key".into(),
        )
    })?;
    Ok(minisign_id(sig.keynum()))
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
