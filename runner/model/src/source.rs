//! Source files and positions inside them.
//!
//! Every node the loader produces carries a [`Span`], so any later stage (extends, rules,
//! the plan) can point the user at the exact line that caused a problem.

use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Index of a file in [`Sources`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct FileId(pub u32);

/// A position in a source file: byte offset plus 1-based line and column.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct Span {
    pub file: FileId,
    pub offset: usize,
    pub line: u32,
    pub col: u32,
}

/// One loaded file.
#[derive(Debug)]
pub struct SourceFile {
    /// Path as the user should see it (relative to the project when possible).
    pub display: String,
    pub path: PathBuf,
    pub text: Arc<str>,
}

/// All files read while loading a pipeline, so diagnostics can show snippets.
#[derive(Debug, Default)]
pub struct Sources {
    files: Vec<SourceFile>,
}

impl Sources {
    pub fn add(&mut self, path: &Path, display: String, text: Arc<str>) -> FileId {
        self.files.push(SourceFile {
            display,
            path: path.to_path_buf(),
            text,
        });
        FileId((self.files.len() - 1) as u32)
    }

    pub fn get(&self, id: FileId) -> Option<&SourceFile> {
        self.files.get(id.0 as usize)
    }

    pub fn find(&self, path: &Path) -> Option<FileId> {
        self.files
            .iter()
            .position(|f| f.path == path)
            .map(|i| FileId(i as u32))
    }

    pub fn len(&self) -> usize {
        self.files.len()
    }

    pub fn is_empty(&self) -> bool {
        self.files.is_empty()
    }

    /// `file:line:col` for a span, the form editors and terminals link.
    pub fn location(&self, span: Span) -> String {
        match self.get(span.file) {
            Some(f) => format!("{}:{}:{}", f.display, span.line, span.col),
            None => format!("<unknown>:{}:{}", span.line, span.col),
        }
    }
}
