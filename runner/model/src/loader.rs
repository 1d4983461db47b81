//! Reading pipeline files: `include: local`, `extends`, `!reference` and `default`.
//!
//! The order is GitLab's: includes are merged first (included files under the main file),
//! then `extends` is resolved, then `!reference` tags. The result is one YAML tree that the
//! typed model is read from; spans still point into the file each value came from.

use std::collections::HashSet;
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;

use indexmap::IndexMap;

use crate::diag::{Diagnostic, did_you_mean};
use crate::external::{External, IncludeSource, IncludedFile};
use crate::source::{Sources, Span};
use crate::yaml::{self, Key, Limits, Node, Value};

/// GitLab allows 150 included files per pipeline; rave uses the same ceiling.
const MAX_INCLUDES: usize = 150;
/// GitLab resolves at most 11 levels of `extends`.
const MAX_EXTENDS_DEPTH: usize = 11;
/// GitLab resolves at most 10 levels of nested `!reference`.
const MAX_REFERENCE_DEPTH: usize = 10;

/// Candidate pipeline files, in the order rave looks for them.
pub const DEFAULT_FILES: [&str; 2] = ["pipeline.yml", ".gitlab-ci.yml"];

pub struct Loader<'a, 's> {
    pub root_dir: &'a Path,
    pub sources: &'a mut Sources,
    pub diagnostics: &'a mut Vec<Diagnostic>,
    pub limits: Limits,
    /// The files of the commit being built, relative to `root_dir` with `/` separators.
    /// `include: local` reads only these (GitLab reads includes from the commit, so an
    /// untracked file must not change the pipeline). None when there is no repository.
    pub files: Option<&'a [String]>,
    /// Top-level keys used through YAML aliases in any file loaded.
    pub aliased: HashSet<String>,
    /// The main file's `spec:` header document, if it has one.
    pub header: Option<Node>,
    /// Fetches includes from outside the repository; None refuses them with a hint.
    pub source: Option<&'s mut dyn IncludeSource>,
    /// Variables `include: rules: if` and the `expand_vars` input function see (the
    /// trigger's predefined and pipeline variables).
    pub variables: IndexMap<String, String>,
    /// Values for the main file's `spec: inputs` (`rave run --input`).
    pub inputs: Vec<(String, Node)>,
    /// Every file included from outside the repository, pinned.
    pub external: Vec<IncludedFile>,
    included: usize,
}

/// A file being loaded: its identity (for loop detection), what to show, and for a file of
/// another project, that project and commit.
struct FileCtx {
    identity: String,
    display: String,
    project: Option<(String, String)>,
}

/// Inputs given to an included file: name → value as written.
type Inputs = Vec<(String, Node)>;

/// One file an `include:` entry names.
enum Target {
    Local(PathBuf),
    External(External),
}

/// Find the pipeline file: `--file` if given, else `pipeline.yml`, else `.gitlab-ci.yml`.
pub fn find_pipeline_file(root: &Path, file: Option<&Path>) -> Result<PathBuf, Diagnostic> {
    if let Some(f) = file {
        let p = if f.is_absolute() {
            f.to_path_buf()
        } else {
            root.join(f)
        };
        return if p.is_file() {
            Ok(p)
        } else {
            Err(Diagnostic::error(
                format!("pipeline file `{}` does not exist", f.display()),
                None,
            )
            .with_help("check the path given to --file"))
        };
    }
    for name in DEFAULT_FILES {
        let p = root.join(name);
        if p.is_file() {
            return Ok(p);
        }
    }
    Err(Diagnostic::error(
        format!(
            "no pipeline file in {}: looked for {}",
            root.display(),
            DEFAULT_FILES.join(" and ")
        ),
        None,
    )
    .with_help("run rave in the repository root, or name the file with --file"))
}

impl<'a, 's> Loader<'a, 's> {
    pub fn new(
        root_dir: &'a Path,
        sources: &'a mut Sources,
        diagnostics: &'a mut Vec<Diagnostic>,
    ) -> Self {
        Loader {
            root_dir,
            sources,
            diagnostics,
            limits: Limits::default(),
            files: None,
            aliased: HashSet::new(),
            header: None,
            source: None,
            variables: IndexMap::new(),
            inputs: Vec::new(),
            external: Vec::new(),
            included: 0,
        }
    }

    /// Read `include: local` files only from this list (the commit's tracked files).
    pub fn with_files(mut self, files: Option<&'a [String]>) -> Self {
        self.files = files;
        self
    }

    fn display(&self, path: &Path) -> String {
        let canon_root = self.root_dir.canonicalize().ok();
        path.strip_prefix(self.root_dir)
            .ok()
            .or_else(|| {
                canon_root
                    .as_deref()
                    .and_then(|r| path.strip_prefix(r).ok())
            })
            .unwrap_or(path)
            .display()
            .to_string()
    }

    fn read(&mut self, path: &Path, from: Option<Span>) -> Option<yaml::Parsed> {
        let display = self.display(path);
        match std::fs::metadata(path) {
            Ok(m) if m.len() > self.limits.max_file_bytes as u64 => {
                self.diagnostics.push(
                    Diagnostic::error(
                        format!(
                            "`{display}` is {} bytes, more than the limit of {} bytes",
                            m.len(),
                            self.limits.max_file_bytes
                        ),
                        from,
                    )
                    .with_help("split the pipeline with `include: local`"),
                );
                return None;
            }
            _ => {}
        }
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) => {
                self.diagnostics.push(
                    Diagnostic::error(format!("cannot read `{display}`: {e}"), from).root_cause(),
                );
                return None;
            }
        };
        self.parse_text(path, display, text)
    }

    fn parse_text(&mut self, path: &Path, display: String, text: String) -> Option<yaml::Parsed> {
        let id = self.sources.add(path, display, Arc::from(text));
        let text = self.sources.get(id).map(|f| f.text.clone())?;
        match yaml::parse_file(&text, id, self.limits) {
            Ok(parsed) => {
                for w in &parsed.warnings {
                    self.diagnostics.push(
                        Diagnostic::warning(w.message.clone(), Some(w.span))
                            .with_help_opt(w.help.clone()),
                    );
                }
                self.aliased.extend(parsed.aliased_keys.iter().cloned());
                Some(parsed)
            }
            Err(e) => {
                self.diagnostics
                    .push(Diagnostic::error(e.message, Some(e.span)).with_help_opt(e.help));
                None
            }
        }
    }

    /// Load the main file with its includes merged in. Returns None after reporting errors.
    pub fn load(&mut self, main: &Path) -> Option<Node> {
        let mut stack = Vec::new();
        let inputs = std::mem::take(&mut self.inputs);
        let parsed = self.read(main, None)?;
        let display = self.display(main);
        let ctx = FileCtx {
            identity: format!("{}\u{0}{display}", canonical(main)),
            display,
            project: None,
        };
        let header = parsed.header.clone();
        let node = self.load_parsed(parsed, &ctx, &inputs, None, &mut stack);
        self.header = header;
        node
    }

    fn load_local(
        &mut self,
        path: &Path,
        inputs: &[(String, Node)],
        from: Option<Span>,
        stack: &mut Vec<String>,
    ) -> Option<Node> {
        let display = self.display(path);
        // Loops are found by the file itself; messages show the path as the user wrote it.
        let identity = format!("{}\u{0}{display}", canonical(path));
        if self.is_loop(&identity, from, stack) {
            return None;
        }
        let parsed = self.read(path, from)?;
        let ctx = FileCtx {
            identity,
            display,
            project: None,
        };
        self.load_parsed(parsed, &ctx, inputs, from, stack)
    }

    fn load_external(
        &mut self,
        what: &External,
        inputs: &[(String, Node)],
        from: Span,
        stack: &mut Vec<String>,
    ) -> Option<Node> {
        let Some(source) = self.source.as_deref_mut() else {
            self.diagnostics.push(
                Diagnostic::error(
                    format!(
                        "`include: {}` ({}) needs rave to fetch files from outside the repository",
                        what.kind(),
                        what.describe()
                    ),
                    Some(from),
                )
                .with_help("run `rave lint`/`rave run` in a git repository whose `origin` names the forge, or pass --server-url")
                .root_cause(),
            );
            return None;
        };
        let fetched = match source.fetch(what) {
            Ok(f) => f,
            Err(e) => {
                self.diagnostics.push(
                    Diagnostic::error(
                        format!("`include: {}` {}: {e}", what.kind(), what.describe()),
                        Some(from),
                    )
                    .root_cause(),
                );
                return None;
            }
        };
        let identity = format!(
            "{}:{}\u{0}{}",
            fetched.origin.kind, fetched.display, fetched.display
        );
        if self.is_loop(&identity, Some(from), stack) {
            return None;
        }
        if fetched.text.len() > self.limits.max_file_bytes {
            self.diagnostics.push(Diagnostic::error(
                format!(
                    "`{}` is {} bytes, more than the limit of {} bytes",
                    fetched.display,
                    fetched.text.len(),
                    self.limits.max_file_bytes
                ),
                Some(from),
            ));
            return None;
        }
        if !self.external.contains(&fetched.origin) {
            self.external.push(fetched.origin.clone());
        }
        let display = fetched.display.clone();
        let parsed = self.parse_text(Path::new(&display), display.clone(), fetched.text)?;
        let ctx = FileCtx {
            identity,
            display,
            project: fetched.project,
        };
        self.load_parsed(parsed, &ctx, inputs, Some(from), stack)
    }

    fn is_loop(&mut self, identity: &str, from: Option<Span>, stack: &[String]) -> bool {
        let Some(pos) = stack.iter().position(|p| p == identity) else {
            return false;
        };
        let chain: Vec<&str> = stack[pos..]
            .iter()
            .map(String::as_str)
            .chain(std::iter::once(identity))
            .map(|p| p.rsplit_once('\u{0}').map_or(p, |(_, d)| d))
            .collect();
        self.diagnostics.push(
            Diagnostic::error(format!("include loop: {}", chain.join(" → ")), from)
                .with_help("remove one of these includes"),
        );
        true
    }

    /// A parsed file: inputs interpolated, its own includes loaded and merged under it.
    fn load_parsed(
        &mut self,
        parsed: yaml::Parsed,
        ctx: &FileCtx,
        inputs: &[(String, Node)],
        from: Option<Span>,
        stack: &mut Vec<String>,
    ) -> Option<Node> {
        let mut node = parsed.root;
        match &parsed.header {
            Some(h) => {
                crate::inputs::interpolate(h, inputs, &self.variables, &mut node, self.diagnostics)
            }
            None => {
                if let Some((name, v)) = inputs.first() {
                    self.diagnostics.push(
                        Diagnostic::error(
                            format!(
                                "`{}` takes no inputs (it has no `spec: inputs` header), but input `{name}` is given",
                                ctx.display
                            ),
                            from.or(Some(v.span)),
                        )
                        .with_help("remove `inputs:` from the include, or add a `spec:` header to the file"),
                    );
                }
            }
        }
        let span = node.span;
        let Value::Map(mut entries) = node.value else {
            if node.is_null() {
                return Some(Node::new(Value::Map(Vec::new()), span));
            }
            self.diagnostics.push(
                Diagnostic::error(
                    format!(
                        "a pipeline file must be a mapping of keys to jobs, but `{}` holds {}",
                        ctx.display,
                        node.type_name()
                    ),
                    Some(span),
                )
                .with_help("start the file with `stages:` or a job name followed by `:`"),
            );
            return None;
        };
        let include_pos = entries.iter().position(|(k, _)| k.name == "include");
        let Some(pos) = include_pos else {
            return Some(Node::new(Value::Map(entries), span));
        };
        let (_, include) = entries.remove(pos);
        stack.push(ctx.identity.clone());
        let mut merged = Node::new(Value::Map(Vec::new()), span);
        for (target, item_inputs, at) in self.include_targets(&include, ctx) {
            self.included += 1;
            if self.included > MAX_INCLUDES {
                self.diagnostics.push(Diagnostic::error(
                    format!("more than {MAX_INCLUDES} included files"),
                    Some(at),
                ));
                break;
            }
            let loaded = match &target {
                Target::Local(file) => self.load_local(file, &item_inputs, Some(at), stack),
                Target::External(what) => self.load_external(what, &item_inputs, at, stack),
            };
            if let Some(n) = loaded {
                deep_merge(&mut merged, n);
            }
        }
        stack.pop();
        deep_merge(&mut merged, Node::new(Value::Map(entries), span));
        Some(merged)
    }

    /// The files an `include:` value names, in order, with the inputs given to each; entries
    /// whose `rules` leave them out are dropped. Errors are reported, not returned.
    fn include_targets(&mut self, include: &Node, ctx: &FileCtx) -> Vec<(Target, Inputs, Span)> {
        let items: Vec<&Node> = match &include.value {
            Value::Seq(s) => s.iter().collect(),
            _ => vec![include],
        };
        let mut out = Vec::new();
        for item in items {
            match &item.value {
                Value::Str(s) => {
                    if s.starts_with("http://") || s.starts_with("https://") {
                        let what = External::Remote {
                            url: s.clone(),
                            integrity: None,
                        };
                        out.push((Target::External(what), Vec::new(), item.span));
                    } else {
                        for t in self.local_targets(s, item.span, ctx) {
                            out.push((t, Vec::new(), item.span));
                        }
                    }
                }
                Value::Map(m) => {
                    const KEYS: &[&str] = &[
                        "local",
                        "remote",
                        "project",
                        "ref",
                        "file",
                        "template",
                        "component",
                        "rules",
                        "inputs",
                        "integrity",
                    ];
                    for (k, _) in m {
                        if !KEYS.contains(&k.name.as_str()) {
                            self.diagnostics.push(
                                Diagnostic::error(
                                    format!("unknown key `{}` in an `include:` entry", k.name),
                                    Some(k.span),
                                )
                                .with_help_opt(did_you_mean(&k.name, KEYS.iter().copied())),
                            );
                        }
                    }
                    if let Some(rules) = item.get("rules")
                        && !self.include_rules_match(rules)
                    {
                        continue;
                    }
                    let inputs: Vec<(String, Node)> = match item.get("inputs") {
                        Some(i) => match i.as_map() {
                            Some(m) => m.iter().map(|(k, v)| (k.name.clone(), v.clone())).collect(),
                            None => {
                                self.diagnostics.push(Diagnostic::error(
                                    format!(
                                        "`include: inputs` must be a mapping, not {}",
                                        i.type_name()
                                    ),
                                    Some(i.span),
                                ));
                                Vec::new()
                            }
                        },
                        None => Vec::new(),
                    };
                    let str_of = |this: &mut Self, key: &str| -> Option<(String, Span)> {
                        let v = item.get(key)?;
                        match v
                            .scalar_string()
                            .filter(|_| !matches!(v.value, Value::Null))
                        {
                            Some(s) => Some((s, v.span)),
                            None => {
                                this.diagnostics.push(Diagnostic::error(
                                    format!(
                                        "`include: {key}` must be a string, not {}",
                                        v.type_name()
                                    ),
                                    Some(v.span),
                                ));
                                None
                            }
                        }
                    };
                    if item.get("local").is_some() {
                        let Some((path, span)) = str_of(self, "local") else {
                            continue;
                        };
                        for t in self.local_targets(&path, span, ctx) {
                            out.push((t, inputs.clone(), span));
                        }
                    } else if item.get("remote").is_some() {
                        let Some((url, span)) = str_of(self, "remote") else {
                            continue;
                        };
                        let integrity = str_of(self, "integrity").map(|(s, _)| s);
                        out.push((
                            Target::External(External::Remote { url, integrity }),
                            inputs,
                            span,
                        ));
                    } else if item.get("project").is_some() {
                        let Some((project, span)) = str_of(self, "project") else {
                            continue;
                        };
                        let reference = str_of(self, "ref").map(|(s, _)| s);
                        let files: Vec<(String, Span)> = match item.get("file") {
                            Some(f) => match &f.value {
                                Value::Seq(list) => list
                                    .iter()
                                    .filter_map(|x| x.scalar_string().map(|s| (s, x.span)))
                                    .collect(),
                                _ => f.scalar_string().map(|s| (s, f.span)).into_iter().collect(),
                            },
                            None => {
                                self.diagnostics.push(
                                    Diagnostic::error(
                                        "`include: project` needs `file:`",
                                        Some(span),
                                    )
                                    .with_help("name the file(s) to include from the project: `file: /templates/ci.yml`"),
                                );
                                continue;
                            }
                        };
                        for (file, fspan) in files {
                            out.push((
                                Target::External(External::Project {
                                    project: project.clone(),
                                    reference: reference.clone(),
                                    file: file.trim_start_matches('/').to_string(),
                                }),
                                inputs.clone(),
                                fspan,
                            ));
                        }
                    } else if item.get("template").is_some() {
                        let Some((name, span)) = str_of(self, "template") else {
                            continue;
                        };
                        out.push((Target::External(External::Template { name }), inputs, span));
                    } else if item.get("component").is_some() {
                        let Some((address, span)) = str_of(self, "component") else {
                            continue;
                        };
                        // `$CI_SERVER_FQDN` and friends are allowed in component addresses.
                        let address =
                            crate::vars::expand(&address, &|k| self.variables.get(k).cloned());
                        out.push((
                            Target::External(External::Component { address }),
                            inputs,
                            span,
                        ));
                    } else {
                        let first = m.first().map(|(k, _)| k);
                        let d = Diagnostic::error(
                            "an `include:` entry needs `local`, `remote`, `project`, `template` or `component`".to_string(),
                            Some(first.map_or(item.span, |k| k.span)),
                        )
                        .with_help_opt(first.and_then(|k| {
                            did_you_mean(
                                &k.name,
                                ["local", "remote", "project", "template", "component"],
                            )
                        }));
                        self.diagnostics.push(d);
                    }
                }
                _ => {
                    self.diagnostics.push(Diagnostic::error(
                        format!(
                            "`include:` takes a path, a mapping or a list, not {}",
                            item.type_name()
                        ),
                        Some(item.span),
                    ));
                }
            }
        }
        out
    }

    /// `include: local` in a file: the main project's files, or, in a file that came from
    /// another project, that project's file at the same commit.
    fn local_targets(&mut self, pattern: &str, span: Span, ctx: &FileCtx) -> Vec<Target> {
        if let Some((project, sha)) = &ctx.project {
            if pattern.contains('*') {
                self.diagnostics.push(Diagnostic::error(
                    format!("`{pattern}`: wildcards in `include: local` of a file from another project are not supported"),
                    Some(span),
                ).with_help("name the files one by one"));
                return Vec::new();
            }
            return vec![Target::External(External::Project {
                project: project.clone(),
                reference: Some(sha.clone()),
                file: pattern.trim_start_matches('/').to_string(),
            })];
        }
        self.expand_local(pattern, span)
            .unwrap_or_default()
            .into_iter()
            .map(Target::Local)
            .collect()
    }

    /// `include: rules:`: the first rule whose `if` and `exists` match decides (`when: never`
    /// leaves the file out); no match leaves it out. `changes` counts as matching (there is
    /// nothing to compare with when a pipeline file is read).
    fn include_rules_match(&mut self, rules: &Node) -> bool {
        let Some(list) = rules.as_seq() else {
            self.diagnostics.push(Diagnostic::error(
                format!("`include: rules` must be a list, not {}", rules.type_name()),
                Some(rules.span),
            ));
            return false;
        };
        for rule in list {
            let Some(m) = rule.as_map() else {
                self.diagnostics.push(Diagnostic::error(
                    format!(
                        "an include rule must be a mapping, not {}",
                        rule.type_name()
                    ),
                    Some(rule.span),
                ));
                return false;
            };
            for (k, _) in m {
                if !["if", "exists", "changes", "when"].contains(&k.name.as_str()) {
                    self.diagnostics.push(
                        Diagnostic::error(
                            format!("unknown key `{}` in an include rule", k.name),
                            Some(k.span),
                        )
                        .with_help("include rules take `if`, `exists`, `changes` and `when`"),
                    );
                }
            }
            let mut matched = true;
            if let Some(cond) = rule.get("if").and_then(Node::scalar_string) {
                match crate::expr::parse(&cond) {
                    Ok(e) => {
                        let vars = &self.variables;
                        match e.eval_checked(&|k| vars.get(k).cloned()) {
                            Ok(v) => matched &= v,
                            Err(msg) => {
                                self.diagnostics.push(Diagnostic::error(
                                    format!("include rule `if: {cond}`: {msg}"),
                                    rule.get("if").map(|n| n.span),
                                ));
                                return false;
                            }
                        }
                    }
                    Err(err) => {
                        self.diagnostics.push(Diagnostic::error(
                            format!(
                                "invalid `if` expression in an include rule: {}",
                                err.message
                            ),
                            rule.get("if").map(|n| n.span),
                        ));
                        return false;
                    }
                }
            }
            if let Some(ex) = rule.get("exists") {
                let patterns: Vec<String> = match &ex.value {
                    Value::Seq(items) => items.iter().filter_map(Node::scalar_string).collect(),
                    Value::Map(_) => ex
                        .get("paths")
                        .and_then(Node::as_seq)
                        .map(|i| i.iter().filter_map(Node::scalar_string).collect())
                        .unwrap_or_default(),
                    _ => ex.scalar_string().into_iter().collect(),
                };
                let files = self.candidate_files();
                matched &= patterns.iter().any(|p| {
                    globset::GlobBuilder::new(p.trim_start_matches('/'))
                        .literal_separator(true)
                        .build()
                        .map(|g| {
                            let g = g.compile_matcher();
                            files.iter().any(|f| g.is_match(f))
                        })
                        .unwrap_or(false)
                });
            }
            if matched {
                return rule.get("when").and_then(Node::as_str) != Some("never");
            }
        }
        false
    }

    fn expand_local(&mut self, pattern: &str, span: Span) -> Option<Vec<PathBuf>> {
        let rel = pattern.trim_start_matches('/');
        let escapes = Path::new(rel)
            .components()
            .any(|c| matches!(c, Component::ParentDir | Component::Prefix(_)));
        if escapes {
            self.diagnostics.push(Diagnostic::error(
                format!("`{pattern}` points outside the repository"),
                Some(span),
            ));
            return None;
        }
        let files = self.candidate_files();
        if !rel.contains('*') {
            if !has_yaml_extension(rel) {
                self.diagnostics.push(
                    Diagnostic::error(
                        format!("included file `{pattern}` does not have a YAML extension"),
                        Some(span),
                    )
                    .with_help("GitLab includes only `.yml` and `.yaml` files"),
                );
                return None;
            }
            if !files.iter().any(|f| f == rel) {
                let on_disk = self.root_dir.join(rel).is_file();
                let d = if on_disk && !is_rave_dir(rel) {
                    Diagnostic::error(
                        format!("included file `{pattern}` is not committed"),
                        Some(span),
                    )
                    .with_label("not tracked by git")
                    .with_help(format!(
                        "`git add {rel}`: included files are read from the commit being built, as GitLab does"
                    ))
                } else {
                    Diagnostic::error(
                        format!("included file `{pattern}` does not exist"),
                        Some(span),
                    )
                    .with_label("not found")
                    .with_help("include: local paths are relative to the repository root")
                };
                self.diagnostics.push(d.root_cause());
                return None;
            }
            return Some(vec![self.root_dir.join(rel)]);
        }
        let re = match wildcard_regex(rel) {
            Ok(re) => re,
            Err(e) => {
                self.diagnostics.push(Diagnostic::error(
                    format!("bad wildcard `{pattern}`: {e}"),
                    Some(span),
                ));
                return None;
            }
        };
        let mut matched: Vec<PathBuf> = Vec::new();
        for f in files.iter().filter(|f| re.is_match(f)) {
            if !has_yaml_extension(f) {
                self.diagnostics.push(
                    Diagnostic::error(
                        format!("`{pattern}` matches `{f}`, which does not have a YAML extension"),
                        Some(span),
                    )
                    .with_help("GitLab includes only `.yml` and `.yaml` files; narrow the pattern"),
                );
                continue;
            }
            matched.push(self.root_dir.join(f));
        }
        if matched.is_empty() {
            self.diagnostics.push(
                Diagnostic::error(format!("`{pattern}` matches no file"), Some(span))
                    .with_help("include: local globs are relative to the repository root; `*` stays in one directory, `**` crosses them")
                    .root_cause(),
            );
        }
        Some(matched)
    }

    /// Files an include may name: the commit's files, or (outside a repository) the files on
    /// disk; never rave's own `.rave/` directory.
    fn candidate_files(&self) -> Vec<String> {
        let mut out: Vec<String> = match self.files {
            Some(f) => f.to_vec(),
            None => {
                let mut v = Vec::new();
                walk(self.root_dir, self.root_dir, 0, &mut |rel, _| {
                    v.push(rel.to_string_lossy().replace('\\', "/"));
                });
                v
            }
        };
        out.retain(|f| !is_rave_dir(f));
        out.sort();
        out
    }
}

fn is_rave_dir(rel: &str) -> bool {
    rel == ".rave" || rel.starts_with(".rave/")
}

fn has_yaml_extension(path: &str) -> bool {
    path.ends_with(".yml") || path.ends_with(".yaml")
}

/// GitLab's grammar for `include: local` wildcards: the pattern is matched whole, every
/// character is literal except `**/` (any run of directories, or none), `**` (anything,
/// `/` included) and `*` (anything but `/`). So `*.yml` stays in the root and `**.yml` or
/// `ci/**/*.yml` reach into subdirectories. globset differs (`{a,b}`, `?`, `[…]` are special,
/// `**` alone is not), hence this small translation to a regex.
pub fn wildcard_regex(pattern: &str) -> Result<regex::Regex, regex::Error> {
    let escaped = regex::escape(pattern);
    let translated = escaped
        .replace(r"\*\*/", "(.*?/)?")
        .replace(r"\*\*", ".*?")
        .replace(r"\*", "([^/])*?");
    regex::RegexBuilder::new(&format!("^{translated}$"))
        .size_limit(1 << 20)
        .build()
}

fn canonical(path: &Path) -> String {
    path.canonicalize()
        .unwrap_or_else(|_| path.to_path_buf())
        .to_string_lossy()
        .into_owned()
}

/// Visit the repository's files (not `.git`), bounded in depth.
fn walk(root: &Path, dir: &Path, depth: usize, f: &mut dyn FnMut(&Path, &Path)) {
    if depth > 32 {
        return;
    }
    let Ok(rd) = std::fs::read_dir(dir) else {
        return;
    };
    let mut entries: Vec<_> = rd.flatten().collect();
    entries.sort_by_key(|e| e.file_name());
    for e in entries {
        let name = e.file_name();
        if name == ".git" || name == "target" || name == "node_modules" {
            continue;
        }
        let path = e.path();
        let Ok(ft) = e.file_type() else { continue };
        if ft.is_dir() {
            walk(root, &path, depth + 1, f);
        } else if ft.is_file()
            && let Ok(rel) = path.strip_prefix(root)
        {
            f(rel, &path);
        }
    }
}

/// GitLab's deep merge: mappings merge key by key, anything else is replaced by `over`.
pub fn deep_merge(base: &mut Node, over: Node) {
    match (&mut base.value, over.value) {
        (Value::Map(b), Value::Map(o)) => {
            for (k, v) in o {
                if let Some((_, existing)) = b.iter_mut().find(|(bk, _)| bk.name == k.name) {
                    deep_merge(existing, v);
                } else {
                    b.push((k, v));
                }
            }
        }
        (_, v) => {
            base.value = v;
            base.span = over.span;
            base.tag = over.tag;
        }
    }
}

/// Resolve `extends` on every top-level entry. Errors are reported; entries that fail keep
/// their own keys only.
pub fn resolve_extends(root: &mut Node, diagnostics: &mut Vec<Diagnostic>) {
    let Value::Map(entries) = &root.value else {
        return;
    };
    let names: Vec<String> = entries.iter().map(|(k, _)| k.name.clone()).collect();
    let mut resolved: Vec<Option<Node>> = vec![None; entries.len()];
    let mut reported: HashSet<String> = HashSet::new();
    for i in 0..entries.len() {
        let mut stack = Vec::new();
        resolve_one(
            entries,
            &names,
            i,
            &mut resolved,
            &mut stack,
            diagnostics,
            &mut reported,
        );
    }
    if let Value::Map(entries) = &mut root.value {
        for (i, (_, v)) in entries.iter_mut().enumerate() {
            if let Some(r) = resolved[i].take() {
                *v = r;
            }
        }
    }
}

fn extends_list(node: &Node) -> Vec<(String, Span)> {
    match node.get("extends") {
        Some(Node {
            value: Value::Str(s),
            span,
            ..
        }) => vec![(s.clone(), *span)],
        Some(Node {
            value: Value::Seq(items),
            ..
        }) => items
            .iter()
            .filter_map(|n| n.as_str().map(|s| (s.to_string(), n.span)))
            .collect(),
        _ => Vec::new(),
    }
}

fn resolve_one(
    entries: &[(Key, Node)],
    names: &[String],
    i: usize,
    resolved: &mut Vec<Option<Node>>,
    stack: &mut Vec<usize>,
    diagnostics: &mut Vec<Diagnostic>,
    reported: &mut HashSet<String>,
) -> Node {
    if let Some(r) = &resolved[i] {
        return r.clone();
    }
    let node = &entries[i].1;
    if let Some(ext) = node.get("extends")
        && !matches!(ext.value, Value::Str(_) | Value::Seq(_))
    {
        diagnostics.push(Diagnostic::error(
            format!(
                "`extends` takes a name or a list of names, not {}",
                ext.type_name()
            ),
            Some(ext.span),
        ));
    }
    let parents = extends_list(node);
    if parents.is_empty() {
        resolved[i] = Some(node.clone());
        return node.clone();
    }
    stack.push(i);
    let mut base = Node::new(Value::Map(Vec::new()), node.span);
    for (parent, span) in parents {
        let Some(pi) = names.iter().position(|n| *n == parent) else {
            let help = did_you_mean(&parent, names.iter().map(String::as_str));
            diagnostics.push(
                Diagnostic::error(
                    format!("`{}` extends `{parent}`, which is not defined", names[i]),
                    Some(span),
                )
                .with_label("unknown name")
                .with_help_opt(help)
                .follow_on(),
            );
            continue;
        };
        if let Some(pos) = stack.iter().position(|s| *s == pi) {
            let mut chain: Vec<&str> = stack[pos..].iter().map(|s| names[*s].as_str()).collect();
            chain.push(&names[pi]);
            let text = chain.join(" → ");
            if reported.insert(text.clone()) {
                diagnostics.push(
                    Diagnostic::error(format!("extends loop: {text}"), Some(span))
                        .with_help("remove one `extends` in this loop"),
                );
            }
            continue;
        }
        if stack.len() >= MAX_EXTENDS_DEPTH {
            diagnostics.push(Diagnostic::error(
                format!(
                    "`{}` extends more than {MAX_EXTENDS_DEPTH} levels deep",
                    names[stack[0]]
                ),
                Some(span),
            ));
            continue;
        }
        let p = resolve_one(entries, names, pi, resolved, stack, diagnostics, reported);
        deep_merge(&mut base, p);
    }
    stack.pop();
    deep_merge(&mut base, node.clone());
    if let Value::Map(m) = &mut base.value {
        m.retain(|(k, _)| k.name != "extends");
    }
    base.span = node.span;
    resolved[i] = Some(base.clone());
    base
}

/// Replace every `!reference [a, b, …]` with the node it points to.
pub fn resolve_references(root: &mut Node, diagnostics: &mut Vec<Diagnostic>) {
    let snapshot = root.clone();
    resolve_refs_in(root, &snapshot, 0, diagnostics);
}

fn resolve_refs_in(node: &mut Node, root: &Node, depth: usize, diagnostics: &mut Vec<Diagnostic>) {
    if node.tag.as_deref() == Some("reference") {
        let span = node.span;
        let path: Option<Vec<String>> = node
            .as_seq()
            .map(|s| s.iter().filter_map(|n| n.scalar_string()).collect());
        let Some(path) = path.filter(|p| !p.is_empty()) else {
            diagnostics.push(
                Diagnostic::error("`!reference` takes a list of keys", Some(span))
                    .with_help("write `!reference [.job, script]`"),
            );
            return;
        };
        if depth >= MAX_REFERENCE_DEPTH {
            diagnostics.push(Diagnostic::error(
                format!("`!reference` nested more than {MAX_REFERENCE_DEPTH} levels deep (or a reference loop)"),
                Some(span),
            ));
            node.tag = None;
            return;
        }
        let mut target = root;
        for (i, key) in path.iter().enumerate() {
            match target.get(key) {
                Some(t) => target = t,
                None => {
                    let candidates: Vec<&str> = target
                        .as_map()
                        .map(|m| m.iter().map(|(k, _)| k.name.as_str()).collect())
                        .unwrap_or_default();
                    let help = did_you_mean(key, candidates);
                    diagnostics.push(
                        Diagnostic::error(
                            format!(
                                "`!reference [{}]` points at nothing: `{}` has no key `{key}`",
                                path.join(", "),
                                if i == 0 {
                                    "the pipeline".to_string()
                                } else {
                                    path[..i].join(".")
                                }
                            ),
                            Some(span),
                        )
                        .with_help_opt(help)
                        .follow_on(),
                    );
                    node.tag = None;
                    node.value = Value::Null;
                    return;
                }
            }
        }
        let mut replacement = target.clone();
        resolve_refs_in(&mut replacement, root, depth + 1, diagnostics);
        *node = replacement;
        return;
    }
    match &mut node.value {
        Value::Seq(items) => {
            for it in items {
                resolve_refs_in(it, root, depth, diagnostics);
            }
        }
        Value::Map(m) => {
            for (_, v) in m {
                resolve_refs_in(v, root, depth, diagnostics);
            }
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::FileId;

    fn parse(s: &str) -> Node {
        yaml::parse(s, FileId(0), Limits::default()).unwrap()
    }

    #[test]
    fn extends_merges_deeply_and_job_wins() {
        let mut n = parse(
            ".a:\n  variables: {A: 1, B: 1}\n  script: [a]\n.b:\n  extends: .a\n  variables: {B: 2}\njob:\n  extends: .b\n  variables: {C: 3}\n",
        );
        let mut d = Vec::new();
        resolve_extends(&mut n, &mut d);
        assert!(d.is_empty(), "{d:?}");
        let job = n.get("job").unwrap();
        let v = job.get("variables").unwrap();
        assert_eq!(v.get("A").unwrap().value, Value::Int(1));
        assert_eq!(v.get("B").unwrap().value, Value::Int(2));
        assert_eq!(v.get("C").unwrap().value, Value::Int(3));
        assert!(job.get("script").is_some());
        assert!(job.get("extends").is_none());
    }

    #[test]
    fn extends_loop_is_reported_once_as_a_chain() {
        let mut n = parse("a:\n  extends: b\nb:\n  extends: c\nc:\n  extends: a\n");
        let mut d = Vec::new();
        resolve_extends(&mut n, &mut d);
        assert_eq!(d.len(), 1, "{d:?}");
        assert!(d[0].message.contains("a → b → c → a"), "{}", d[0].message);
    }

    #[test]
    fn references_resolve_nested() {
        let mut n = parse(
            ".s:\n  script: [one, two]\n.t:\n  script: [!reference [.s, script], three]\njob:\n  script: !reference [.t, script]\n",
        );
        let mut d = Vec::new();
        resolve_references(&mut n, &mut d);
        assert!(d.is_empty(), "{d:?}");
        let s = n
            .get("job")
            .unwrap()
            .get("script")
            .unwrap()
            .as_seq()
            .unwrap();
        assert_eq!(s.len(), 2);
        assert_eq!(s[0].as_seq().unwrap().len(), 2);
    }

    #[test]
    fn reference_loop_is_bounded() {
        let mut n = parse(".a:\n  x: !reference [.b, x]\n.b:\n  x: !reference [.a, x]\n");
        let mut d = Vec::new();
        resolve_references(&mut n, &mut d);
        assert!(!d.is_empty());
    }
}
