//! A YAML tree that remembers where every node came from.
//!
//! Built from `yaml-rust2` parser events rather than its `Yaml` type because that type drops
//! positions, and because building it ourselves lets us bound what hostile input can cost:
//! alias expansion ("billion laughs"), nesting depth and node count are all capped here, before
//! anything is allocated for them. Merge keys (`<<`) are applied here too, as GitLab does.

use std::collections::HashMap;

use yaml_rust2::parser::{Event, MarkedEventReceiver, Parser, Tag};
use yaml_rust2::scanner::{Marker, TScalarStyle};

use crate::source::{FileId, Span};

/// Limits that keep a hostile file from costing unbounded time or memory.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Largest file accepted, in bytes.
    pub max_file_bytes: usize,
    /// Most nodes one document may expand to, aliases included.
    pub max_nodes: usize,
    /// Deepest nesting accepted.
    pub max_depth: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_file_bytes: 4 * 1024 * 1024,
            max_nodes: 250_000,
            // GitLab's YAML loader refuses documents nested deeper than 100 levels.
            max_depth: 100,
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    Null,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
    Seq(Vec<Node>),
    Map(Vec<(Key, Node)>),
}

/// A mapping key: always a string in GitLab CI, with its own position.
#[derive(Clone, Debug, PartialEq)]
pub struct Key {
    pub name: String,
    pub span: Span,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Node {
    pub value: Value,
    pub span: Span,
    /// Local tag such as `reference` for `!reference`.
    pub tag: Option<String>,
}

impl Node {
    pub fn new(value: Value, span: Span) -> Self {
        Node {
            value,
            span,
            tag: None,
        }
    }

    pub fn type_name(&self) -> &'static str {
        match self.value {
            Value::Null => "null",
            Value::Bool(_) => "a boolean",
            Value::Int(_) => "an integer",
            Value::Float(_) => "a number",
            Value::Str(_) => "a string",
            Value::Seq(_) => "a list",
            Value::Map(_) => "a mapping",
        }
    }

    pub fn as_map(&self) -> Option<&[(Key, Node)]> {
        match &self.value {
            Value::Map(m) => Some(m),
            _ => None,
        }
    }

    pub fn as_seq(&self) -> Option<&[Node]> {
        match &self.value {
            Value::Seq(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match &self.value {
            Value::Str(s) => Some(s),
            _ => None,
        }
    }

    /// A scalar rendered as GitLab would see it in a string context (`variables:` values).
    pub fn scalar_string(&self) -> Option<String> {
        match &self.value {
            Value::Str(s) => Some(s.clone()),
            Value::Int(i) => Some(i.to_string()),
            Value::Float(f) => Some(f.to_string()),
            Value::Bool(b) => Some(b.to_string()),
            Value::Null => Some(String::new()),
            _ => None,
        }
    }

    pub fn get(&self, key: &str) -> Option<&Node> {
        self.as_map()?
            .iter()
            .find(|(k, _)| k.name == key)
            .map(|(_, v)| v)
    }

    pub fn is_null(&self) -> bool {
        matches!(self.value, Value::Null)
    }

    /// Number of nodes in this subtree, used to charge alias expansion against the budget.
    pub fn weight(&self) -> usize {
        1 + match &self.value {
            Value::Seq(s) => s.iter().map(Node::weight).sum(),
            Value::Map(m) => m.iter().map(|(_, v)| 1 + v.weight()).sum(),
            _ => 0,
        }
    }
}

/// A YAML problem with its position.
#[derive(Debug, Clone, PartialEq)]
pub struct YamlError {
    pub message: String,
    pub span: Span,
    pub help: Option<String>,
}

/// A problem GitLab accepts but a user should hear about (a key written twice).
#[derive(Debug, Clone, PartialEq)]
pub struct YamlWarning {
    pub message: String,
    pub span: Span,
    pub help: Option<String>,
}

/// A parsed file: the pipeline document, the `spec:` header document before it (if any),
/// warnings, and the top-level keys whose values (or parts of them) are used through YAML
/// aliases, so "hidden job never used" knows about `<<: *anchor`.
#[derive(Debug, Clone)]
pub struct Parsed {
    pub root: Node,
    pub header: Option<Node>,
    pub warnings: Vec<YamlWarning>,
    pub aliased_keys: Vec<String>,
}

/// Parse a file's pipeline document into a [`Node`] (warnings and header dropped).
pub fn parse(text: &str, file: FileId, limits: Limits) -> Result<Node, YamlError> {
    parse_file(text, file, limits).map(|p| p.root)
}

/// Parse a pipeline file as GitLab does: one document, or a `spec:` header document followed
/// by `---` and the pipeline. A second document after a non-header first one is ignored by
/// GitLab; rave says so in a warning. More than two documents are refused.
pub fn parse_file(text: &str, file: FileId, limits: Limits) -> Result<Parsed, YamlError> {
    if text.len() > limits.max_file_bytes {
        return Err(YamlError {
            message: format!(
                "file is {} bytes, more than the limit of {} bytes",
                text.len(),
                limits.max_file_bytes
            ),
            span: Span {
                file,
                offset: 0,
                line: 1,
                col: 1,
            },
            help: Some("split the pipeline with `include: local`".into()),
        });
    }
    let mut builder = Builder {
        lines: LineIndex::new(text),
        file,
        limits,
        stack: Vec::new(),
        anchors: HashMap::new(),
        docs: Vec::new(),
        nodes: 0,
        error: None,
        warnings: Vec::new(),
        top_key: None,
        anchor_keys: HashMap::new(),
        aliased_keys: Vec::new(),
    };
    let mut parser = Parser::new_from_str(text);
    if let Err(e) = parser.load(&mut builder, true) {
        let m = e.marker();
        return Err(YamlError {
            message: format!("invalid YAML: {}", e.info()),
            span: builder.lines.span(file, m),
            help: None,
        });
    }
    if let Some(e) = builder.error {
        return Err(e);
    }
    let start = Span {
        file,
        offset: 0,
        line: 1,
        col: 1,
    };
    let mut docs = std::mem::take(&mut builder.docs);
    // An empty document after the first (a trailing `---`) holds nothing to ignore.
    while docs.len() > 1 && docs.last().is_some_and(Node::is_null) {
        docs.pop();
    }
    let mut warnings = std::mem::take(&mut builder.warnings);
    let is_header = |n: &Node| n.get("spec").is_some();
    if docs.len() > 2 {
        return Err(YamlError {
            message: format!(
                "the file holds {} YAML documents; a pipeline file has at most two",
                docs.len()
            ),
            span: docs[2].span,
            help: Some("keep one document, or a `spec:` header, `---`, then the pipeline".into()),
        });
    }
    let header = if docs.len() == 2 && is_header(&docs[0]) {
        Some(docs.remove(0))
    } else {
        None
    };
    if docs.len() == 2 {
        warnings.push(YamlWarning {
            message: "this second YAML document is ignored".into(),
            span: docs[1].span,
            help: Some(
                "GitLab reads only the first document unless it is a `spec:` header; merge the documents or remove the `---`".into(),
            ),
        });
    }
    let root = docs
        .into_iter()
        .next()
        .unwrap_or(Node::new(Value::Null, start));
    let mut aliased_keys = std::mem::take(&mut builder.aliased_keys);
    aliased_keys.sort();
    aliased_keys.dedup();
    Ok(Parsed {
        root,
        header,
        warnings,
        aliased_keys,
    })
}

/// yaml-rust2 counts positions in characters; spans hold byte offsets so snippets can be
/// sliced. Lines are found through a table of line starts, then the column is walked.
struct LineIndex<'t> {
    text: &'t str,
    starts: Vec<usize>,
}

impl<'t> LineIndex<'t> {
    fn new(text: &'t str) -> Self {
        let mut starts = vec![0];
        starts.extend(
            text.bytes()
                .enumerate()
                .filter(|(_, b)| *b == b'\n')
                .map(|(i, _)| i + 1),
        );
        LineIndex { text, starts }
    }

    fn span(&self, file: FileId, m: &Marker) -> Span {
        let line = m.line().max(1);
        let start = self
            .starts
            .get(line - 1)
            .copied()
            .unwrap_or(self.text.len());
        let rest = &self.text[start..];
        let offset = start
            + rest
                .char_indices()
                .nth(m.col())
                .map_or(rest.len(), |(i, _)| i);
        Span {
            file,
            offset,
            line: line as u32,
            col: m.col() as u32 + 1,
        }
    }
}

enum Frame {
    Seq {
        anchor: usize,
        tag: Option<String>,
        span: Span,
        items: Vec<Node>,
    },
    Map {
        anchor: usize,
        tag: Option<String>,
        span: Span,
        entries: Vec<(Key, Node)>,
        pending_key: Option<Node>,
    },
}

struct Builder<'t> {
    lines: LineIndex<'t>,
    file: FileId,
    limits: Limits,
    stack: Vec<Frame>,
    anchors: HashMap<usize, Node>,
    /// Completed documents, in order.
    docs: Vec<Node>,
    nodes: usize,
    error: Option<YamlError>,
    warnings: Vec<YamlWarning>,
    /// The top-level key whose value is being built, and the top-level key each anchor was
    /// defined under: an alias of that anchor counts as a use of the key.
    top_key: Option<String>,
    anchor_keys: HashMap<usize, String>,
    aliased_keys: Vec<String>,
}

fn local_tag(tag: Option<Tag>) -> Option<String> {
    tag.map(|t| {
        if t.handle == "!" {
            t.suffix
        } else {
            format!("{}{}", t.handle, t.suffix)
        }
    })
}

fn resolve_plain(s: String) -> Value {
    // GitLab reads YAML with Ruby's Psych, which follows YAML 1.1 here: `yes`/`no`/`on`/`off`
    // are booleans too, in any case, and so is `null`.
    let lower = s.to_ascii_lowercase();
    match lower.as_str() {
        "" | "~" | "null" => return Value::Null,
        "true" | "yes" | "on" => return Value::Bool(true),
        "false" | "no" | "off" => return Value::Bool(false),
        _ => {}
    }
    let bytes = s.as_bytes();
    let numeric_start = bytes
        .first()
        .is_some_and(|c| c.is_ascii_digit() || *c == b'-' || *c == b'+' || *c == b'.');
    if numeric_start {
        if let Ok(i) = s.parse::<i64>() {
            return Value::Int(i);
        }
        if let Some(hex) = s.strip_prefix("0x")
            && let Ok(i) = i64::from_str_radix(hex, 16)
        {
            return Value::Int(i);
        }
        if s.chars().any(|c| c.is_ascii_digit())
            && let Ok(f) = s.parse::<f64>()
            && f.is_finite()
        {
            return Value::Float(f);
        }
    }
    Value::Str(s)
}

impl Builder<'_> {
    fn fail(&mut self, message: String, span: Span, help: Option<&str>) {
        if self.error.is_none() {
            self.error = Some(YamlError {
                message,
                span,
                help: help.map(str::to_string),
            });
        }
    }

    fn charge(&mut self, n: usize, span: Span) -> bool {
        self.nodes = self.nodes.saturating_add(n);
        if self.nodes > self.limits.max_nodes {
            self.fail(
                format!(
                    "document expands to more than {} nodes",
                    self.limits.max_nodes
                ),
                span,
                Some("this usually means aliases (`*name`) nested inside each other; reduce them"),
            );
            return false;
        }
        true
    }

    fn push_value(&mut self, node: Node, anchor: usize) {
        if anchor > 0 {
            self.anchors.insert(anchor, node.clone());
            if let Some(k) = &self.top_key {
                self.anchor_keys.insert(anchor, k.clone());
            }
        }
        let depth = self.stack.len();
        match self.stack.last_mut() {
            None => self.docs.push(node),
            Some(Frame::Seq { items, .. }) => items.push(node),
            Some(Frame::Map {
                entries,
                pending_key,
                ..
            }) => match pending_key.take() {
                None => {
                    if depth == 1 {
                        self.top_key = node.scalar_string();
                    }
                    *pending_key = Some(node)
                }
                Some(k) => {
                    let name = match k.value {
                        Value::Str(s) => s,
                        Value::Int(i) => i.to_string(),
                        Value::Float(f) => f.to_string(),
                        Value::Bool(b) => b.to_string(),
                        Value::Null => String::new(),
                        Value::Seq(_) | Value::Map(_) => {
                            let span = k.span;
                            self.fail(
                                "a mapping key must be a plain value, not a list or mapping".into(),
                                span,
                                None,
                            );
                            return;
                        }
                    };
                    if depth == 1 {
                        self.top_key = None;
                    }
                    // GitLab (Psych) keeps the last value of a key written twice, in the place
                    // of the first; rave does the same and warns, since it is rarely meant.
                    if name != "<<"
                        && let Some((first, value)) =
                            entries.iter_mut().find(|(e, _)| e.name == name)
                    {
                        self.warnings.push(YamlWarning {
                            message: format!(
                                "key `{name}` appears twice in this mapping; the later value (line {}) wins",
                                k.span.line
                            ),
                            span: first.span,
                            help: Some(format!(
                                "first written at line {}:{}, again at line {}:{}; keep one of them",
                                first.span.line, first.span.col, k.span.line, k.span.col
                            )),
                        });
                        *value = node;
                        return;
                    }
                    entries.push((Key { name, span: k.span }, node));
                }
            },
        }
    }

    fn finish_map(span: Span, entries: Vec<(Key, Node)>) -> Result<Vec<(Key, Node)>, YamlError> {
        // Merge keys: explicit keys win over merged ones; earlier merge sources win over later
        // ones, as in the YAML 1.1 merge spec that GitLab follows.
        if !entries.iter().any(|(k, _)| k.name == "<<") {
            return Ok(entries);
        }
        let mut own = Vec::with_capacity(entries.len());
        let mut merged: Vec<(Key, Node)> = Vec::new();
        for (k, v) in entries {
            if k.name != "<<" {
                own.push((k, v));
                continue;
            }
            let sources: Vec<Node> = match v.value {
                Value::Map(_) => vec![v],
                Value::Seq(items) => items,
                _ => {
                    return Err(YamlError {
                        message: format!("`<<` merges a mapping, but got {}", v.type_name()),
                        span: k.span,
                        help: Some("write `<<: *anchor` where the anchor names a mapping".into()),
                    });
                }
            };
            for src in sources {
                let Value::Map(m) = src.value else {
                    return Err(YamlError {
                        message: "`<<` merges a mapping, but a list item is not one".into(),
                        span: src.span,
                        help: None,
                    });
                };
                for (mk, mv) in m {
                    if !merged.iter().any(|(k2, _)| k2.name == mk.name) {
                        merged.push((mk, mv));
                    }
                }
            }
        }
        let _ = span;
        for (mk, mv) in merged {
            if !own.iter().any(|(k2, _)| k2.name == mk.name) {
                own.push((mk, mv));
            }
        }
        Ok(own)
    }
}

impl MarkedEventReceiver for Builder<'_> {
    fn on_event(&mut self, ev: Event, mark: Marker) {
        if self.error.is_some() {
            return;
        }
        let span = self.lines.span(self.file, &mark);
        match ev {
            Event::Nothing
            | Event::StreamStart
            | Event::StreamEnd
            | Event::DocumentStart
            | Event::DocumentEnd => {}
            Event::Alias(id) => {
                if let Some(k) = self.anchor_keys.get(&id) {
                    self.aliased_keys.push(k.clone());
                }
                let Some(weight) = self.anchors.get(&id).map(Node::weight) else {
                    self.fail("alias refers to an unknown anchor".into(), span, None);
                    return;
                };
                if !self.charge(weight, span) {
                    return;
                }
                let Some(mut node) = self.anchors.get(&id).cloned() else {
                    return;
                };
                node.span = span;
                self.push_value(node, 0);
            }
            Event::Scalar(value, style, anchor, tag) => {
                if !self.charge(1, span) {
                    return;
                }
                let tag = local_tag(tag);
                let v = if style == TScalarStyle::Plain && tag.is_none() {
                    resolve_plain(value)
                } else {
                    Value::Str(value)
                };
                self.push_value(
                    Node {
                        value: v,
                        span,
                        tag,
                    },
                    anchor,
                );
            }
            Event::SequenceStart(..) | Event::MappingStart(..) => {
                let is_seq = matches!(ev, Event::SequenceStart(..));
                let (Event::SequenceStart(anchor, tag) | Event::MappingStart(anchor, tag)) = ev
                else {
                    return;
                };
                if !self.charge(1, span) {
                    return;
                }
                if self.stack.len() >= self.limits.max_depth {
                    self.fail(
                        format!("nesting is deeper than {} levels", self.limits.max_depth),
                        span,
                        Some("a pipeline never needs this much nesting; check for a generated or corrupted file"),
                    );
                    return;
                }
                let tag = local_tag(tag);
                let frame = if is_seq {
                    Frame::Seq {
                        anchor,
                        tag,
                        span,
                        items: Vec::new(),
                    }
                } else {
                    Frame::Map {
                        anchor,
                        tag,
                        span,
                        entries: Vec::new(),
                        pending_key: None,
                    }
                };
                self.stack.push(frame);
            }
            Event::SequenceEnd | Event::MappingEnd => match self.stack.pop() {
                Some(Frame::Seq {
                    anchor,
                    tag,
                    span,
                    items,
                }) => self.push_value(
                    Node {
                        value: Value::Seq(items),
                        span,
                        tag,
                    },
                    anchor,
                ),
                Some(Frame::Map {
                    anchor,
                    tag,
                    span,
                    entries,
                    ..
                }) => match Self::finish_map(span, entries) {
                    Ok(entries) => self.push_value(
                        Node {
                            value: Value::Map(entries),
                            span,
                            tag,
                        },
                        anchor,
                    ),
                    Err(e) => {
                        if self.error.is_none() {
                            self.error = Some(e);
                        }
                    }
                },
                None => self.fail("unbalanced YAML structure".into(), span, None),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> Result<Node, YamlError> {
        parse(s, FileId(0), Limits::default())
    }

    #[test]
    fn scalars_resolve_like_yaml_1_1_core() {
        let n = p("a: 1\nb: true\nc: ~\nd: '1'\ne: 1.5\nf: hello\n").unwrap();
        assert_eq!(n.get("a").unwrap().value, Value::Int(1));
        assert_eq!(n.get("b").unwrap().value, Value::Bool(true));
        assert_eq!(n.get("c").unwrap().value, Value::Null);
        assert_eq!(n.get("d").unwrap().value, Value::Str("1".into()));
        assert_eq!(n.get("e").unwrap().value, Value::Float(1.5));
        assert_eq!(n.get("f").unwrap().value, Value::Str("hello".into()));
    }

    #[test]
    fn spans_point_at_values() {
        let n = p("job:\n  script: echo\n").unwrap();
        let s = n.get("job").unwrap().get("script").unwrap();
        assert_eq!((s.span.line, s.span.col), (2, 11));
    }

    #[test]
    fn spans_are_byte_offsets_after_multibyte_text() {
        let text = "ҟҟ: 1\njob: x\n";
        let n = p(text).unwrap();
        let (k, _) = &n.as_map().unwrap()[1];
        assert_eq!(&text[k.span.offset..k.span.offset + 3], "job");
        assert_eq!((k.span.line, k.span.col), (2, 1));
    }

    #[test]
    fn duplicate_keys_keep_the_last_value_with_a_warning() {
        let parsed = parse_file(
            "job:\n  image: a\n  image: b\n",
            FileId(0),
            Limits::default(),
        )
        .unwrap();
        let job = parsed.root.get("job").unwrap();
        assert_eq!(job.get("image").unwrap().value, Value::Str("b".into()));
        assert_eq!(job.as_map().unwrap().len(), 1);
        assert_eq!(parsed.warnings.len(), 1);
        let w = &parsed.warnings[0];
        assert!(w.message.contains("`image` appears twice"), "{}", w.message);
        assert_eq!(w.span.line, 2);
        assert!(w.help.as_deref().unwrap().contains("line 3:3"), "{w:?}");
    }

    #[test]
    fn yaml_1_1_booleans_as_psych_reads_them() {
        let n = p("a: yes\nb: Off\nc: ON\nd: 'yes'\ne: NULL\nf: y\n").unwrap();
        assert_eq!(n.get("a").unwrap().value, Value::Bool(true));
        assert_eq!(n.get("b").unwrap().value, Value::Bool(false));
        assert_eq!(n.get("c").unwrap().value, Value::Bool(true));
        assert_eq!(n.get("d").unwrap().value, Value::Str("yes".into()));
        assert_eq!(n.get("e").unwrap().value, Value::Null);
        assert_eq!(n.get("f").unwrap().value, Value::Str("y".into()));
    }

    #[test]
    fn spec_header_document_is_split_off() {
        let parsed = parse_file(
            "spec:\n  inputs:\n    a: {default: x}\n---\njob: {script: echo}\n",
            FileId(0),
            Limits::default(),
        )
        .unwrap();
        assert!(parsed.header.unwrap().get("spec").is_some());
        assert!(parsed.root.get("job").is_some());
        assert!(parsed.warnings.is_empty());
    }

    #[test]
    fn a_second_plain_document_is_ignored_with_a_warning_and_a_third_refused() {
        let parsed = parse_file(
            "a: {script: x}\n---\nb: {script: y}\n",
            FileId(0),
            Limits::default(),
        )
        .unwrap();
        assert!(parsed.root.get("a").is_some() && parsed.root.get("b").is_none());
        assert_eq!(parsed.warnings.len(), 1);
        assert_eq!(parsed.warnings[0].span.line, 3);
        let e =
            parse_file("a: 1\n---\nb: 2\n---\nc: 3\n", FileId(0), Limits::default()).unwrap_err();
        assert!(e.message.contains("3 YAML documents"), "{}", e.message);
    }

    #[test]
    fn keys_used_through_aliases_are_reported() {
        let parsed = parse_file(
            ".base: &b\n  script: [x]\n.parts:\n  vars: &v {A: 1}\n.unused: {x: 1}\njob:\n  <<: *b\n  variables: *v\n",
            FileId(0),
            Limits::default(),
        )
        .unwrap();
        assert_eq!(parsed.aliased_keys, [".base", ".parts"]);
    }

    #[test]
    fn merge_keys_do_not_override_explicit_keys() {
        let n = p(".base: &b\n  a: 1\n  b: 2\njob:\n  <<: *b\n  b: 3\n").unwrap();
        let job = n.get("job").unwrap();
        assert_eq!(job.get("a").unwrap().value, Value::Int(1));
        assert_eq!(job.get("b").unwrap().value, Value::Int(3));
        assert!(job.get("<<").is_none());
    }

    #[test]
    fn reference_tag_is_kept() {
        let n = p("job:\n  script: !reference [.a, script]\n").unwrap();
        let s = n.get("job").unwrap().get("script").unwrap();
        assert_eq!(s.tag.as_deref(), Some("reference"));
    }

    #[test]
    fn billion_laughs_is_refused() {
        let mut s = String::from("a: &a [x, x, x, x, x, x, x, x, x, x]\n");
        let mut prev = 'a';
        for c in 'b'..='j' {
            s.push_str(&format!(
                "{c}: &{c} [*{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}]\n"
            ));
            prev = c;
        }
        let e = p(&s).unwrap_err();
        assert!(e.message.contains("more than"), "{}", e.message);
    }

    #[test]
    fn deep_nesting_is_refused() {
        let s = format!("{}{}", "[".repeat(10_000), "]".repeat(10_000));
        let e = p(&s).unwrap_err();
        assert!(e.message.contains("recursion limit"), "{}", e.message);
        // Below the parser's own limit, rave's depth cap applies.
        let s = format!("{}{}", "[".repeat(120), "]".repeat(120));
        let e = p(&s).unwrap_err();
        assert!(
            e.message.contains("nesting is deeper than 100"),
            "{}",
            e.message
        );
    }

    #[test]
    fn huge_file_is_refused() {
        let limits = Limits {
            max_file_bytes: 10,
            ..Limits::default()
        };
        let e = parse("a: 123456789012", FileId(0), limits).unwrap_err();
        assert!(e.message.contains("limit"));
    }
}
