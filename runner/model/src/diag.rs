//! Diagnostics: what went wrong, where, and how to fix it.
//!
//! Every problem found while loading or planning a pipeline becomes a [`Diagnostic`] with a
//! span; the CLI renders them compiler-style (`file:line:col`, the snippet, a caret, a hint).

use annotate_snippets::{AnnotationKind, Level, Renderer, Snippet};
use serde::Serialize;

use crate::source::{Sources, Span};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    Error,
    Warning,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Diagnostic {
    pub severity: Severity,
    pub message: String,
    pub span: Option<Span>,
    /// Short text under the caret.
    pub label: Option<String>,
    pub help: Option<String>,
    /// What this diagnostic is to others: a root cause (a refused or unreadable include) that
    /// may explain later errors, or an error that such a cause may explain ("extends `x`,
    /// which is not defined"). See [`collapse_follow_ons`].
    pub role: Role,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Role {
    #[default]
    Plain,
    RootCause,
    FollowOn,
}

/// When a root cause is present (an include that could not be read), drop the errors that it
/// may explain (names that are not defined) and say how many were hidden, so the user sees
/// the one thing to fix instead of dozens of consequences.
pub fn collapse_follow_ons(diags: &mut Vec<Diagnostic>) {
    let Some(root) = diags.iter().position(|d| d.role == Role::RootCause) else {
        return;
    };
    let before = diags.len();
    diags.retain(|d| d.role != Role::FollowOn);
    let hidden = before - diags.len();
    if hidden > 0 {
        let root = diags
            .iter()
            .position(|d| d.role == Role::RootCause)
            .unwrap_or(root);
        let note = format!(
            "{hidden} more error(s) about undefined names are hidden: they likely follow from this one; fix it and run again"
        );
        let d = &mut diags[root];
        d.help = Some(match d.help.take() {
            Some(h) => format!("{h}\n{note}"),
            None => note,
        });
    }
}

impl Diagnostic {
    pub fn error(message: impl Into<String>, span: Option<Span>) -> Self {
        Diagnostic {
            severity: Severity::Error,
            message: message.into(),
            span,
            label: None,
            help: None,
            role: Role::Plain,
        }
    }

    /// Mark as a root cause that may explain later errors.
    pub fn root_cause(mut self) -> Self {
        self.role = Role::RootCause;
        self
    }

    /// Mark as an error a root cause may explain.
    pub fn follow_on(mut self) -> Self {
        self.role = Role::FollowOn;
        self
    }

    pub fn warning(message: impl Into<String>, span: Option<Span>) -> Self {
        Diagnostic {
            severity: Severity::Warning,
            ..Diagnostic::error(message, span)
        }
    }

    pub fn with_help(mut self, help: impl Into<String>) -> Self {
        self.help = Some(help.into());
        self
    }

    pub fn with_help_opt(mut self, help: Option<String>) -> Self {
        self.help = help;
        self
    }

    pub fn with_label(mut self, label: impl Into<String>) -> Self {
        self.label = Some(label.into());
        self
    }

    pub fn is_error(&self) -> bool {
        self.severity == Severity::Error
    }

    /// Render for a terminal (or a snapshot when `color` is false).
    pub fn render(&self, sources: &Sources, color: bool) -> String {
        let renderer = if color {
            Renderer::styled()
        } else {
            Renderer::plain()
        };
        let level = match self.severity {
            Severity::Error => Level::ERROR,
            Severity::Warning => Level::WARNING,
        };
        let mut group =
            annotate_snippets::Group::with_title(level.primary_title(self.message.as_str()));
        let file = self.span.and_then(|s| sources.get(s.file).map(|f| (s, f)));
        if let Some((span, f)) = file {
            let text: &str = &f.text;
            let mut start = span.offset.min(text.len());
            while !text.is_char_boundary(start) {
                start -= 1;
            }
            let end = start + token_len(&text[start..]);
            let mut annotation = AnnotationKind::Primary.span(start..end);
            if let Some(label) = &self.label {
                annotation = annotation.label(label.as_str());
            }
            group = group.element(
                Snippet::source(text)
                    .path(f.display.as_str())
                    .annotation(annotation),
            );
        }
        if let Some(help) = &self.help {
            group = group.element(Level::HELP.message(help.as_str()));
        }
        renderer.render(&[group])
    }

    /// The location as `file:line:col`, for one-line and JSON output.
    pub fn location(&self, sources: &Sources) -> Option<String> {
        self.span.map(|s| sources.location(s))
    }
}

/// Length of the token starting at the beginning of `rest`, so the caret underlines a whole
/// key or value rather than one character.
fn token_len(rest: &str) -> usize {
    let line = rest.split('\n').next().unwrap_or("");
    if let Some(q) = line.chars().next().filter(|c| *c == '"' || *c == '\'')
        && let Some(end) = line[1..].find(q)
    {
        return end + 2;
    }
    let n = line
        .char_indices()
        .find(|(_, c)| matches!(c, ':' | ',' | ']' | '}' | '#') || c.is_whitespace())
        .map(|(i, _)| i)
        .unwrap_or(line.len());
    n.max(line.chars().next().map_or(0, char::len_utf8))
}

/// The closest candidate to `name`, if it is close enough to be a likely typo.
pub fn suggest<'a>(name: &str, candidates: impl IntoIterator<Item = &'a str>) -> Option<String> {
    let mut best: Option<(f64, &str)> = None;
    for c in candidates {
        let score = strsim::jaro_winkler(name, c);
        if best.is_none_or(|(b, _)| score > b) {
            best = Some((score, c));
        }
    }
    best.filter(|(s, _)| *s >= 0.8).map(|(_, c)| c.to_string())
}

/// `did you mean `x`?` help text, if a candidate is close.
pub fn did_you_mean<'a>(
    name: &str,
    candidates: impl IntoIterator<Item = &'a str>,
) -> Option<String> {
    suggest(name, candidates).map(|s| format!("did you mean `{s}`?"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn suggests_close_names_only() {
        assert_eq!(
            suggest("scirpt", ["script", "stage", "image"]).as_deref(),
            Some("script")
        );
        assert_eq!(suggest("zzzz", ["script", "stage"]), None);
    }

    #[test]
    fn token_len_covers_words_and_quotes() {
        assert_eq!(token_len("scirpt: x"), 6);
        assert_eq!(token_len("\"a b\": x"), 5);
        assert_eq!(token_len(""), 0);
    }
}
