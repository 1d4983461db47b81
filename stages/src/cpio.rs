//! A `newc` cpio archive writer: what the kernel unpacks as an initramfs. Files are streamed
//! from disk; nothing is held whole in memory.

use std::io::{self, Write};
use std::path::Path;

pub struct Cpio<W: Write> {
    out: W,
    ino: u32,
    written: u64,
}

impl<W: Write> Cpio<W> {
    pub fn new(out: W) -> Self {
        Cpio {
            out,
            ino: 1,
            written: 0,
        }
    }

    fn header(&mut self, name: &str, mode: u32, size: u64) -> io::Result<()> {
        let size32 = u32::try_from(size).map_err(|_| {
            io::Error::new(io::ErrorKind::InvalidInput, format!("{name} is over 4 GiB"))
        })?;
        let namesize = name.len() + 1;
        let h = format!(
            "070701{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}",
            self.ino, mode, 0, 0, 1, 0, size32, 0, 0, 0, 0, namesize, 0
        );
        self.ino += 1;
        self.put(h.as_bytes())?;
        self.put(name.as_bytes())?;
        self.put(&[0])?;
        self.pad()
    }

    fn put(&mut self, b: &[u8]) -> io::Result<()> {
        self.out.write_all(b)?;
        self.written += b.len() as u64;
        Ok(())
    }

    fn pad(&mut self) -> io::Result<()> {
        let n = (4 - (self.written % 4) as usize) % 4;
        self.put(&[0u8; 3][..n])
    }

    /// A directory (`name` without a leading `/`).
    pub fn dir(&mut self, name: &str) -> io::Result<()> {
        self.header(name, 0o040755, 0)
    }

    pub fn symlink(&mut self, name: &str, target: &str) -> io::Result<()> {
        self.header(name, 0o120777, target.len() as u64)?;
        self.put(target.as_bytes())?;
        self.pad()
    }

    /// A regular file with the contents of `src` (symlinks followed).
    pub fn file(&mut self, name: &str, src: &Path, mode: u32) -> io::Result<()> {
        let mut f = std::fs::File::open(src)
            .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", src.display())))?;
        let size = f.metadata()?.len();
        self.header(name, 0o100000 | mode, size)?;
        let n = io::copy(&mut f, &mut self.out)?;
        if n != size {
            return Err(io::Error::other(format!(
                "{} changed while being packed",
                src.display()
            )));
        }
        self.written += n;
        self.pad()
    }

    pub fn bytes(&mut self, name: &str, data: &[u8], mode: u32) -> io::Result<()> {
        self.header(name, 0o100000 | mode, data.len() as u64)?;
        self.put(data)?;
        self.pad()
    }

    pub fn finish(mut self) -> io::Result<W> {
        self.header("TRAILER!!!", 0, 0)?;
        self.out.flush()?;
        Ok(self.out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpio_reads_back_what_was_written() {
        let d = tempfile::tempdir().unwrap();
        let src = d.path().join("x");
        std::fs::write(&src, b"hello").unwrap();
        let mut c = Cpio::new(Vec::new());
        c.dir("bin").unwrap();
        c.file("bin/x", &src, 0o755).unwrap();
        c.symlink("bin/y", "x").unwrap();
        let data = c.finish().unwrap();
        let out = d.path().join("a.cpio");
        std::fs::write(&out, &data).unwrap();
        // The format by hand here; the e2e VM test boots a kernel on a real archive.
        assert_eq!(&data[..6], b"070701");
        assert_eq!(data.len() % 4, 0);
        let text = String::from_utf8_lossy(&data);
        for name in ["bin\0", "bin/x\0", "hello", "bin/y\0", "TRAILER!!!\0"] {
            assert!(text.contains(name), "{name}");
        }
    }
}
