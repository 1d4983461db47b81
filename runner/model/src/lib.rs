//! rave's pipeline model: a GitLab CI YAML file (plus rave's `.rave:` settings) read into
//! typed structures that remember where each value was written.
//!
//! Data flow: [`yaml`] parses each file into a spanned tree (bounded against hostile input);
//! [`loader`] merges `include: local` files, resolves `extends` and `!reference`; [`load`]
//! applies `default:` and reads the typed [`Pipeline`] through [`convert`]. Every problem is a
//! [`Diagnostic`] with a position; loading collects them all rather than stopping at the first.

pub mod child;
pub mod convert;
pub mod diag;
pub mod expr;
pub mod external;
pub mod inputs;
pub mod keywords;
pub mod loader;
pub mod pipeline;
pub mod source;
pub mod stage_kinds;
pub mod units;
pub mod vars;
pub mod yaml;

#[cfg(test)]
mod tests;

use std::collections::HashSet;
use std::path::{Path, PathBuf};

pub use diag::{Diagnostic, Severity};
pub use pipeline::*;
pub use source::{FileId, Sources, Span};

use yaml::{Key, Node, Value};

/// The outcome of loading: the pipeline when there were no errors, and every diagnostic.
pub struct Loaded {
    pub sources: Sources,
    pub pipeline: Option<Pipeline>,
    pub diagnostics: Vec<Diagnostic>,
    /// The main pipeline file.
    pub file: Option<PathBuf>,
    /// Files included from outside the repository, pinned to what was read (provenance).
    pub external: Vec<external::IncludedFile>,
}

/// How to load: where included files come from and what include rules and inputs see.
#[derive(Default)]
pub struct LoadOptions<'a> {
    /// The commit's files (relative to the project), which `include: local` reads.
    pub files: Option<&'a [String]>,
    /// Fetches `project`, `remote`, `template` and `component` includes.
    pub source: Option<&'a mut dyn external::IncludeSource>,
    /// Variables `include: rules: if` and `expand_vars` see (the trigger's).
    pub variables: indexmap::IndexMap<String, String>,
    /// Values for the main file's `spec: inputs` (`rave run --input NAME=VALUE`).
    pub inputs: Vec<(String, String)>,
}

impl Loaded {
    /// Nothing loaded yet.
    pub fn empty() -> Loaded {
        Loaded {
            sources: Sources::default(),
            pipeline: None,
            diagnostics: Vec::new(),
            file: None,
            external: Vec::new(),
        }
    }

    pub fn has_errors(&self) -> bool {
        self.diagnostics.iter().any(Diagnostic::is_error)
    }
}

/// Load the pipeline of the project at `root` (`file` overrides the default file names).
/// Included files are looked up on disk; see [`load_from`] to read them from a commit.
pub fn load(root: &Path, file: Option<&Path>) -> Loaded {
    load_from(root, file, None)
}

/// Load, reading `include: local` files only from `files` (the commit's tracked files,
/// relative to `root`), as GitLab reads includes from the commit being built.
pub fn load_from(root: &Path, file: Option<&Path>, files: Option<&[String]>) -> Loaded {
    load_with(
        root,
        file,
        LoadOptions {
            files,
            ..LoadOptions::default()
        },
    )
}

/// Load with everything [`LoadOptions`] can say.
pub fn load_with(root: &Path, file: Option<&Path>, opts: LoadOptions<'_>) -> Loaded {
    let mut sources = Sources::default();
    let mut diagnostics = Vec::new();
    let main = match loader::find_pipeline_file(root, file) {
        Ok(p) => p,
        Err(d) => {
            return Loaded {
                sources,
                pipeline: None,
                diagnostics: vec![d],
                file: None,
                external: Vec::new(),
            };
        }
    };
    let mut loader =
        loader::Loader::new(root, &mut sources, &mut diagnostics).with_files(opts.files);
    loader.source = opts.source;
    loader.variables = opts.variables;
    let span0 = Span::default();
    loader.inputs = opts
        .inputs
        .iter()
        .map(|(k, v)| (k.clone(), inputs::from_text(v, span0)))
        .collect();
    let tree = loader.load(&main);
    let aliased = std::mem::take(&mut loader.aliased);
    let external = std::mem::take(&mut loader.external);
    let pipeline = tree.and_then(|t| from_tree(t, &aliased, &mut diagnostics));
    diag::collapse_follow_ons(&mut diagnostics);
    let has_errors = diagnostics.iter().any(Diagnostic::is_error);
    Loaded {
        sources,
        pipeline: if has_errors { None } else { pipeline },
        diagnostics,
        file: Some(main),
        external,
    }
}

/// Load from a string, for tests and fuzzing (no includes resolved relative to a real dir
/// unless `root` holds them).
pub fn load_str(text: &str) -> Loaded {
    let mut sources = Sources::default();
    let mut diagnostics = Vec::new();
    let id = sources.add(
        Path::new("pipeline.yml"),
        "pipeline.yml".into(),
        std::sync::Arc::from(text),
    );
    let pipeline = match yaml::parse_file(text, id, yaml::Limits::default()) {
        Ok(parsed) => {
            for w in parsed.warnings {
                diagnostics
                    .push(Diagnostic::warning(w.message, Some(w.span)).with_help_opt(w.help));
            }
            let aliased: HashSet<String> = parsed.aliased_keys.into_iter().collect();
            let mut root = parsed.root;
            if let Some(h) = &parsed.header {
                inputs::interpolate(h, &[], &Default::default(), &mut root, &mut diagnostics);
            }
            if let Value::Map(m) = &mut root.value
                && let Some(pos) = m.iter().position(|(k, _)| k.name == "include")
            {
                let span = m[pos].0.span;
                diagnostics.push(Diagnostic::error(
                    "`include` needs a project directory; load the pipeline from its repository",
                    Some(span),
                ));
                m.remove(pos);
            }
            if root.is_null() || root.as_map().is_some() {
                from_tree(root, &aliased, &mut diagnostics)
            } else {
                diagnostics.push(Diagnostic::error(
                    format!(
                        "a pipeline file must be a mapping, not {}",
                        root.type_name()
                    ),
                    Some(root.span),
                ));
                None
            }
        }
        Err(e) => {
            diagnostics.push(Diagnostic::error(e.message, Some(e.span)).with_help_opt(e.help));
            None
        }
    };
    let has_errors = diagnostics.iter().any(Diagnostic::is_error);
    Loaded {
        sources,
        pipeline: if has_errors { None } else { pipeline },
        diagnostics,
        file: None,
        external: Vec::new(),
    }
}

/// Names of hidden keys used through `extends` or `!reference` anywhere in the tree.
fn used_hidden(node: &Node, out: &mut HashSet<String>) {
    if node.tag.as_deref() == Some("reference")
        && let Some(first) = node.as_seq().and_then(|s| s.first()).and_then(Node::as_str)
    {
        out.insert(first.to_string());
    }
    match &node.value {
        Value::Map(m) => {
            for (k, v) in m {
                if k.name == "extends" {
                    match &v.value {
                        Value::Str(s) => {
                            out.insert(s.clone());
                        }
                        Value::Seq(items) => {
                            out.extend(items.iter().filter_map(|i| i.as_str().map(str::to_string)))
                        }
                        _ => {}
                    }
                }
                used_hidden(v, out);
            }
        }
        Value::Seq(items) => items.iter().for_each(|i| used_hidden(i, out)),
        _ => {}
    }
}

fn from_tree(
    mut root: Node,
    aliased: &HashSet<String>,
    diagnostics: &mut Vec<Diagnostic>,
) -> Option<Pipeline> {
    if root.is_null() {
        root.value = Value::Map(Vec::new());
    }
    let mut used = aliased.clone();
    used_hidden(&root, &mut used);
    loader::resolve_extends(&mut root, diagnostics);
    loader::resolve_references(&mut root, diagnostics);
    let mut r = convert::Reader { diags: diagnostics };
    let Value::Map(entries) = &root.value else {
        return None;
    };
    let mut p = Pipeline::default();
    let stages_node = entries
        .iter()
        .find(|(k, _)| k.name == "stages" || k.name == "types");
    let mut stage_names: Vec<String> = Vec::new();
    if let Some((_, n)) = stages_node {
        p.stages = r.stages(n);
        // GitLab always brackets user stages with `.pre` and `.post`.
        stage_names.push(".pre".into());
        stage_names.extend(
            p.stages
                .iter()
                .map(|s| s.value.clone())
                .filter(|s| s != ".pre" && s != ".post"),
        );
        stage_names.push(".post".into());
    } else {
        stage_names = keywords::DEFAULT_STAGES
            .iter()
            .map(|s| s.to_string())
            .collect();
    }
    let span0 = root.span;
    p.stages = stage_names
        .iter()
        .map(|s| {
            let span = p
                .stages
                .iter()
                .find(|x| x.value == *s)
                .map_or(span0, |x| x.span);
            Spanned {
                value: s.clone(),
                span,
            }
        })
        .collect();

    // Defaults: `default:` plus the legacy top-level keys that act like it.
    let mut defaults: Vec<(Key, Node)> = Vec::new();
    for (k, v) in entries {
        if matches!(
            k.name.as_str(),
            "image" | "services" | "before_script" | "after_script" | "cache"
        ) {
            defaults.push((k.clone(), v.clone()));
        }
    }
    if let Some((_, d)) = entries.iter().find(|(k, _)| k.name == "default") {
        match &d.value {
            Value::Map(m) => {
                for (k, v) in m {
                    if !keywords::DEFAULT.contains(&k.name.as_str()) {
                        let help = diag::did_you_mean(&k.name, keywords::DEFAULT.iter().copied());
                        r.diags.push(
                            Diagnostic::error(
                                format!("`default:` cannot set `{}`", k.name),
                                Some(k.span),
                            )
                            .with_help_opt(help.or_else(|| {
                                Some(format!(
                                    "`default:` may set: {}",
                                    keywords::DEFAULT.join(", ")
                                ))
                            })),
                        );
                        continue;
                    }
                    defaults.retain(|(dk, _)| dk.name != k.name);
                    defaults.push((k.clone(), v.clone()));
                }
            }
            Value::Null => {}
            _ => r.diags.push(Diagnostic::error(
                format!("`default` must be a mapping, not {}", d.type_name()),
                Some(d.span),
            )),
        }
    }

    for (k, v) in entries {
        match k.name.as_str() {
            "stages" | "types" | "include" | "default" | "image" | "services" | "before_script"
            | "after_script" | "cache" => {}
            "variables" => p.variables = r.variables(v, "global `variables`"),
            "workflow" => p.workflow = r.workflow(v),
            ".rave" => p.rave = r.rave(v),
            name if name.starts_with('.') => {
                if !used.contains(name) {
                    p.hidden.push(Spanned {
                        value: name.to_string(),
                        span: k.span,
                    });
                }
            }
            _ => {
                if v.as_map().is_none() && !is_global_typo(&k.name) {
                    r.diags.push(
                        Diagnostic::error(
                            format!(
                                "job `{}` must be a mapping with `script:`, not {}",
                                k.name,
                                v.type_name()
                            ),
                            Some(k.span),
                        )
                        .with_help_opt(diag::did_you_mean(
                            &k.name,
                            keywords::GLOBAL.iter().copied(),
                        )),
                    );
                    continue;
                }
                // A mapping without `script:` whose name is a misspelt global keyword
                // (`varaibles:`) is that keyword, not a broken job.
                let looks_like_job = ["script", "trigger", "extends", "stage", "run"]
                    .iter()
                    .any(|key| v.get(key).is_some());
                if v.as_map().is_none() || (!looks_like_job && is_global_typo(&k.name)) {
                    let help = diag::did_you_mean(&k.name, keywords::GLOBAL.iter().copied());
                    r.diags.push(
                        Diagnostic::error(format!("unknown key `{}`", k.name), Some(k.span))
                            .with_label("unknown key")
                            .with_help_opt(help),
                    );
                    continue;
                }
                let job_node = with_defaults(v, &defaults);
                if let Some(job) = r.job(k, &job_node, &stage_names) {
                    if p.jobs.contains_key(&job.name) {
                        r.diags.push(Diagnostic::error(
                            format!("job `{}` is defined twice", job.name),
                            Some(k.span),
                        ));
                    }
                    p.jobs.insert(job.name.clone(), job);
                }
            }
        }
    }
    // Stage kinds under `.rave:` become ordinary jobs.
    let rave_cfg = entries
        .iter()
        .find(|(k, _)| k.name == ".rave")
        .map(|(_, v)| v);
    let mut kind_jobs: Vec<(&str, Key, Node)> = Vec::new();
    if let Some(scan) = rave_cfg.and_then(|v| v.get("scan"))
        && let Some((key, node)) = stage_kinds::scan_job(scan, &stage_names, r.diags)
    {
        kind_jobs.push(("scan", key, node));
    }
    if let Some(image) = rave_cfg.and_then(|v| v.get("image")) {
        for (key, node) in stage_kinds::image_jobs(image, &stage_names, r.diags) {
            kind_jobs.push(("image", key, node));
        }
    }
    for (kind, key, node) in kind_jobs {
        if p.jobs.contains_key(&key.name) {
            r.diags.push(
                Diagnostic::error(
                    format!(
                        "`.rave: {kind}` makes a job `{}`, but the pipeline already has one",
                        key.name
                    ),
                    Some(key.span),
                )
                .with_help(format!(
                    "give the {kind} job another name with `.rave: {kind}: name:`"
                )),
            );
        } else if let Some(job) = r.job(&key, &with_defaults(&node, &defaults), &stage_names) {
            p.jobs.insert(job.name.clone(), job);
        }
    }
    if p.jobs.is_empty() && !r.diags.iter().any(Diagnostic::is_error) {
        r.diags.push(
            Diagnostic::error("the pipeline has no jobs", Some(span0))
                .with_help("add a job: a top-level key whose value has `script:`"),
        );
    }
    for h in &p.hidden {
        r.diags.push(
            Diagnostic::warning(
                format!("hidden job `{}` is never used", h.value),
                Some(h.span),
            )
            .with_help("nothing `extends` or `!reference`s it; remove it or drop the leading `.` to make it a job"),
        );
    }
    Some(p)
}

/// A non-mapping top-level key that looks like a misspelt global keyword (`stage:` for
/// `stages:`) is reported as an unknown key rather than a broken job.
fn is_global_typo(name: &str) -> bool {
    diag::suggest(name, keywords::GLOBAL.iter().copied()).is_some()
}

/// Copy default keys into a job that does not set them, honouring `inherit: default`.
/// A key whose value is null (`artifacts:` with nothing, or `parallel: null` to unset what
/// `extends` brought in) counts as not written, as in GitLab.
fn with_defaults(job: &Node, defaults: &[(Key, Node)]) -> Node {
    let inherit = job.get("inherit").and_then(|i| i.get("default"));
    let allowed = |name: &str| match inherit.map(|n| &n.value) {
        Some(Value::Bool(false)) => false,
        Some(Value::Seq(items)) => items.iter().any(|i| i.as_str() == Some(name)),
        _ => true,
    };
    let mut out = job.clone();
    if let Value::Map(m) = &mut out.value {
        m.retain(|(_, v)| !v.is_null());
        for (k, v) in defaults {
            if allowed(&k.name) && !v.is_null() && !m.iter().any(|(jk, _)| jk.name == k.name) {
                m.push((k.clone(), v.clone()));
            }
        }
    }
    out
}
