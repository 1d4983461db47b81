//! Artifact paths from a request: whatever the path, the file served is inside the job's
//! artifacts directory (symlinks included), and nothing panics.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use rave_server::api::resolve_artifact;

/// A small artifacts tree with a file, a nested file, and symlinks inside and outside.
fn tree() -> &'static (std::path::PathBuf, std::path::PathBuf) {
    static T: OnceLock<(std::path::PathBuf, std::path::PathBuf)> = OnceLock::new();
    T.get_or_init(|| {
        let base = std::env::temp_dir().join(format!("rave-fuzz-art-{}", std::process::id()));
        let root = base.join("artifacts");
        let _ = std::fs::create_dir_all(root.join("dir/sub"));
        let _ = std::fs::write(root.join("a.txt"), "a");
        let _ = std::fs::write(root.join("dir/sub/b.txt"), "b");
        let _ = std::fs::write(base.join("secret"), "s");
        let _ = std::os::unix::fs::symlink(base.join("secret"), root.join("out"));
        let _ = std::os::unix::fs::symlink("a.txt", root.join("in"));
        let root = root.canonicalize().unwrap_or(root);
        (root, base)
    })
}

fuzz_target!(|data: &[u8]| {
    let Ok(path) = std::str::from_utf8(data) else {
        return;
    };
    let (root, _) = tree();
    if let Ok(f) = resolve_artifact(root, path) {
        let real = f.canonicalize().expect("a resolved artifact exists");
        assert!(real.starts_with(root), "{path:?} escaped to {}", real.display());
        assert!(real.is_file());
    }
});
