//! Reading the typed [`Pipeline`] out of the merged YAML tree, reporting every problem found
//! (not just the first) with its position and a hint.

use std::time::Duration;

use indexmap::IndexMap;

use crate::diag::{Diagnostic, did_you_mean};
use crate::expr;
use crate::keywords;
use crate::pipeline::*;
use crate::source::Span;
use crate::units;
use crate::yaml::{Key, Node, Value};

/// Nested lists in scripts (from `!reference`) are flattened this deep, as GitLab does.
const MAX_SCRIPT_NESTING: usize = 10;
/// GitLab caps matrix and `parallel: N` at 200 instances.
const MAX_PARALLEL: usize = 200;

pub struct Reader<'a> {
    pub diags: &'a mut Vec<Diagnostic>,
}

impl Reader<'_> {
    fn err(&mut self, msg: impl Into<String>, span: Span) {
        self.diags.push(Diagnostic::error(msg, Some(span)));
    }

    fn err_help(&mut self, msg: impl Into<String>, span: Span, help: Option<String>) {
        self.diags
            .push(Diagnostic::error(msg, Some(span)).with_help_opt(help));
    }

    fn warn(&mut self, msg: impl Into<String>, span: Span, help: &str) {
        self.diags
            .push(Diagnostic::warning(msg, Some(span)).with_help(help));
    }

    fn map<'n>(&mut self, n: &'n Node, what: &str) -> Option<&'n [(Key, Node)]> {
        match &n.value {
            Value::Map(m) => Some(m),
            _ => {
                self.err(
                    format!("{what} must be a mapping, not {}", n.type_name()),
                    n.span,
                );
                None
            }
        }
    }

    /// Report keys of `m` that are not in `allowed`, with the nearest valid name.
    fn check_keys(&mut self, m: &[(Key, Node)], allowed: &[&str], what: &str) {
        for (k, _) in m {
            if !allowed.contains(&k.name.as_str()) {
                let help = did_you_mean(&k.name, allowed.iter().copied());
                self.diags.push(
                    Diagnostic::error(format!("unknown key `{}` in {what}", k.name), Some(k.span))
                        .with_label("unknown key")
                        .with_help_opt(
                            help.or_else(|| {
                                Some(format!("valid keys are: {}", allowed.join(", ")))
                            }),
                        ),
                );
            }
        }
    }

    fn string(&mut self, n: &Node, what: &str) -> Option<String> {
        match &n.value {
            Value::Str(s) => Some(s.clone()),
            Value::Int(_) | Value::Float(_) | Value::Bool(_) => n.scalar_string(),
            _ => {
                self.err(
                    format!("{what} must be a string, not {}", n.type_name()),
                    n.span,
                );
                None
            }
        }
    }

    fn bool(&mut self, n: &Node, what: &str) -> Option<bool> {
        match n.value {
            Value::Bool(b) => Some(b),
            _ => {
                self.err(
                    format!("{what} must be true or false, not {}", n.type_name()),
                    n.span,
                );
                None
            }
        }
    }

    fn int(&mut self, n: &Node, what: &str, range: std::ops::RangeInclusive<i64>) -> Option<i64> {
        match n.value {
            Value::Int(i) if range.contains(&i) => Some(i),
            Value::Int(i) => {
                self.err(
                    format!(
                        "{what} is {i}, but must be between {} and {}",
                        range.start(),
                        range.end()
                    ),
                    n.span,
                );
                None
            }
            _ => {
                self.err(
                    format!("{what} must be an integer, not {}", n.type_name()),
                    n.span,
                );
                None
            }
        }
    }

    /// A string or a list of strings.
    fn strings(&mut self, n: &Node, what: &str) -> Vec<String> {
        match &n.value {
            Value::Seq(items) => items.iter().filter_map(|i| self.string(i, what)).collect(),
            Value::Null => Vec::new(),
            _ => self.string(n, what).into_iter().collect(),
        }
    }

    /// The items of a list, with nested lists flattened as GitLab flattens them (lists built
    /// with `!reference` or anchors inside `rules`, `needs`, `cache`, `services`), at most
    /// [`MAX_SCRIPT_NESTING`] levels deep. A single non-list value is a list of one.
    fn flat_items<'n>(&mut self, n: &'n Node, what: &str) -> Vec<&'n Node> {
        let mut out = Vec::new();
        self.flatten_into(n, what, 0, &mut out);
        out
    }

    fn flatten_into<'n>(&mut self, n: &'n Node, what: &str, depth: usize, out: &mut Vec<&'n Node>) {
        match &n.value {
            Value::Seq(items) if depth <= MAX_SCRIPT_NESTING => {
                for i in items {
                    self.flatten_into(i, what, depth + 1, out);
                }
            }
            Value::Seq(_) => self.err(
                format!("{what} nests lists more than {MAX_SCRIPT_NESTING} levels deep"),
                n.span,
            ),
            _ => out.push(n),
        }
    }

    fn duration(&mut self, n: &Node, what: &str) -> Option<Duration> {
        let s = n.scalar_string()?;
        match units::parse_duration(&s) {
            Ok(d) => Some(d),
            Err(e) => {
                self.err_help(
                    format!("{what}: {e}"),
                    n.span,
                    Some("write durations like `1h 30m`, `90 minutes` or `7 days`".into()),
                );
                None
            }
        }
    }

    fn script(&mut self, n: &Node, what: &str) -> Vec<String> {
        let mut out = Vec::new();
        self.flatten_script(n, what, 0, &mut out);
        out
    }

    fn flatten_script(&mut self, n: &Node, what: &str, depth: usize, out: &mut Vec<String>) {
        match &n.value {
            Value::Seq(items) if depth <= MAX_SCRIPT_NESTING => {
                for i in items {
                    self.flatten_script(i, what, depth + 1, out);
                }
            }
            Value::Seq(_) => self.err(
                format!("{what} nests lists more than {MAX_SCRIPT_NESTING} levels deep"),
                n.span,
            ),
            Value::Map(_) => self.err_help(
                format!("{what} must be a string or a list of strings, not a mapping"),
                n.span,
                Some("a line containing `: ` must be quoted, e.g. - 'echo \"a: b\"'".into()),
            ),
            Value::Null if depth == 0 => {}
            _ => out.extend(n.scalar_string()),
        }
    }

    pub fn variables(&mut self, n: &Node, what: &str) -> Variables {
        let mut out = Variables::default();
        let Some(m) = self.map(n, what) else {
            return out;
        };
        for (k, v) in m {
            if k.name.is_empty()
                || !k
                    .name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_')
            {
                self.err_help(
                    format!("`{}` is not a valid variable name", k.name),
                    k.span,
                    Some("use letters, digits and `_`".into()),
                );
                continue;
            }
            let (value, raw) = match &v.value {
                Value::Map(vm) => {
                    self.check_keys(
                        vm,
                        &["value", "description", "expand", "options"],
                        "a variable",
                    );
                    let value = v
                        .get("value")
                        .and_then(|x| self.string(x, "a variable's `value`"))
                        .unwrap_or_default();
                    let expand = v.get("expand").and_then(|x| self.bool(x, "`expand`"));
                    (value, expand == Some(false))
                }
                Value::Seq(_) => {
                    self.err(
                        format!(
                            "variable `{}` must be a string or number, not a list",
                            k.name
                        ),
                        v.span,
                    );
                    continue;
                }
                _ => (v.scalar_string().unwrap_or_default(), false),
            };
            out.0.insert(
                k.name.clone(),
                Variable {
                    value,
                    raw,
                    span: v.span,
                },
            );
        }
        out
    }

    fn when(&mut self, n: &Node) -> Option<When> {
        let s = self.string(n, "`when`")?;
        match When::parse(&s) {
            Some(w) => Some(w),
            None => {
                let help = did_you_mean(&s, When::NAMES)
                    .or_else(|| Some(format!("use one of: {}", When::NAMES.join(", "))));
                self.err_help(format!("unknown `when: {s}`"), n.span, help);
                None
            }
        }
    }

    fn allow_failure(&mut self, n: &Node) -> Option<AllowFailure> {
        match &n.value {
            Value::Bool(true) => Some(AllowFailure::Yes),
            Value::Bool(false) => Some(AllowFailure::No),
            Value::Map(m) => {
                self.check_keys(m, &["exit_codes"], "`allow_failure`");
                let codes = n.get("exit_codes")?;
                let list: Vec<i32> = match &codes.value {
                    Value::Seq(items) => items
                        .iter()
                        .filter_map(|i| self.int(i, "an exit code", 0..=255))
                        .map(|i| i as i32)
                        .collect(),
                    _ => self
                        .int(codes, "an exit code", 0..=255)
                        .map(|i| vec![i as i32])
                        .unwrap_or_default(),
                };
                Some(AllowFailure::ExitCodes(list))
            }
            _ => {
                self.err(
                    format!(
                        "`allow_failure` must be true, false or `exit_codes:`, not {}",
                        n.type_name()
                    ),
                    n.span,
                );
                None
            }
        }
    }

    fn expr(&mut self, n: &Node) -> Option<(String, expr::Expr)> {
        let src = self.string(n, "`if`")?;
        match expr::parse(&src) {
            Ok(e) => Some((src, e)),
            Err(e) => {
                // Point inside the expression when it sits on one line after the key.
                let mut span = n.span;
                span.col += e.offset as u32;
                span.offset += e.offset;
                self.err_help(
                    format!("invalid `if` expression: {}", e.message),
                    span,
                    Some(format!("in `{src}`")),
                );
                None
            }
        }
    }

    fn needs(&mut self, n: &Node) -> Option<Vec<Need>> {
        let items: Vec<&Node> = match &n.value {
            Value::Seq(_) => self.flat_items(n, "`needs`"),
            Value::Null => return Some(Vec::new()),
            _ => {
                self.err(
                    format!("`needs` must be a list, not {}", n.type_name()),
                    n.span,
                );
                return None;
            }
        };
        let mut out = Vec::new();
        for it in items {
            match &it.value {
                Value::Str(s) => out.push(Need {
                    job: s.clone(),
                    span: it.span,
                    artifacts: true,
                    optional: false,
                    matrix: None,
                }),
                Value::Map(m) => {
                    self.check_keys(m, keywords::NEED, "a `needs` entry");
                    if it.get("pipeline").is_some() || it.get("project").is_some() {
                        self.err_help(
                            "`needs` on another pipeline or project is not supported",
                            it.span,
                            Some("rave runs one project's pipeline; depend on a job of this pipeline".into()),
                        );
                        continue;
                    }
                    let Some(job) = it.get("job").and_then(|j| self.string(j, "`needs: job`"))
                    else {
                        self.err("a `needs` entry needs `job:`", it.span);
                        continue;
                    };
                    let span = it.get("job").map_or(it.span, |j| j.span);
                    let artifacts = it
                        .get("artifacts")
                        .and_then(|a| self.bool(a, "`needs: artifacts`"))
                        .unwrap_or(true);
                    let optional = it
                        .get("optional")
                        .and_then(|a| self.bool(a, "`needs: optional`"))
                        .unwrap_or(false);
                    let matrix = it
                        .get("parallel")
                        .and_then(|p| p.get("matrix"))
                        .map(|m| self.matrix_rows(m));
                    out.push(Need {
                        job,
                        span,
                        artifacts,
                        optional,
                        matrix,
                    });
                }
                _ => self.err(
                    format!(
                        "a `needs` entry must be a job name or a mapping, not {}",
                        it.type_name()
                    ),
                    it.span,
                ),
            }
        }
        Some(out)
    }

    fn rules(&mut self, n: &Node, allowed: &[&str]) -> Vec<Rule> {
        let Some(list) = n.as_seq() else {
            self.err(
                format!("`rules` must be a list, not {}", n.type_name()),
                n.span,
            );
            return Vec::new();
        };
        if list.is_empty() {
            // GitLab: "rules config can't be blank".
            self.err_help(
                "`rules` is empty",
                n.span,
                Some("remove `rules:` to always add the job, or write `- when: never` to never add it".into()),
            );
            return Vec::new();
        }
        let items = self.flat_items(n, "`rules`");
        let mut out = Vec::new();
        for it in items {
            let Some(m) = self.map(it, "a rule") else {
                continue;
            };
            self.check_keys(m, allowed, "a rule");
            let changes = it.get("changes").map(|c| match &c.value {
                Value::Map(cm) => {
                    self.check_keys(cm, &["paths", "compare_to"], "`changes`");
                    Changes {
                        paths: c
                            .get("paths")
                            .map(|p| self.strings(p, "`changes: paths`"))
                            .unwrap_or_default(),
                        compare_to: c
                            .get("compare_to")
                            .and_then(|x| self.string(x, "`compare_to`")),
                    }
                }
                _ => Changes {
                    paths: self.strings(c, "`changes`"),
                    compare_to: None,
                },
            });
            let exists = it.get("exists").map(|c| match &c.value {
                Value::Map(_) => c
                    .get("paths")
                    .map(|p| self.strings(p, "`exists: paths`"))
                    .unwrap_or_default(),
                _ => self.strings(c, "`exists`"),
            });
            let when = it.get("when").and_then(|w| self.when(w));
            let start_in = it
                .get("start_in")
                .and_then(|d| self.duration(d, "`start_in`"));
            if when == Some(When::Delayed) && start_in.is_none() {
                self.err_help(
                    "`when: delayed` needs `start_in`",
                    it.span,
                    Some("add e.g. `start_in: 5 minutes`".into()),
                );
            }
            out.push(Rule {
                span: it.span,
                if_: it.get("if").and_then(|e| self.expr(e)),
                changes,
                exists,
                when,
                allow_failure: it.get("allow_failure").and_then(|a| self.allow_failure(a)),
                variables: it
                    .get("variables")
                    .map(|v| self.variables(v, "rule `variables`"))
                    .unwrap_or_default(),
                needs: it.get("needs").and_then(|n| self.needs(n)),
                start_in,
            });
        }
        out
    }

    fn retry(&mut self, n: &Node) -> Option<Retry> {
        match &n.value {
            Value::Int(_) => Some(Retry {
                max: self.int(n, "`retry`", 0..=2)? as u32,
                when: Vec::new(),
                exit_codes: Vec::new(),
            }),
            Value::Map(m) => {
                self.check_keys(m, keywords::RETRY, "`retry`");
                let max = n
                    .get("max")
                    .and_then(|x| self.int(x, "`retry: max`", 0..=2))
                    .unwrap_or(0) as u32;
                Some(Retry {
                    max,
                    when: n
                        .get("when")
                        .map(|w| self.strings(w, "`retry: when`"))
                        .unwrap_or_default(),
                    exit_codes: n
                        .get("exit_codes")
                        .map(|w| {
                            let s = match &w.value {
                                Value::Seq(items) => items.iter().collect::<Vec<_>>(),
                                _ => vec![w],
                            };
                            s.into_iter()
                                .filter_map(|c| self.int(c, "an exit code", 0..=255))
                                .map(|c| c as i32)
                                .collect()
                        })
                        .unwrap_or_default(),
                })
            }
            _ => {
                self.err(
                    format!(
                        "`retry` must be a number or a mapping, not {}",
                        n.type_name()
                    ),
                    n.span,
                );
                None
            }
        }
    }

    /// `parallel: matrix:` rows as written in a `needs` selection: each value one name or a
    /// list of names.
    fn matrix_rows(&mut self, m: &Node) -> Vec<IndexMap<String, Vec<String>>> {
        let Some(rows) = m.as_seq() else {
            self.err("`parallel: matrix` must be a list of mappings", m.span);
            return Vec::new();
        };
        let mut out = Vec::new();
        for r in rows {
            let Some(rm) = self.map(r, "a `matrix` entry") else {
                continue;
            };
            out.push(
                rm.iter()
                    .map(|(k, v)| (k.name.clone(), self.strings(v, "a matrix value")))
                    .collect(),
            );
        }
        out
    }

    fn parallel(&mut self, n: &Node) -> Option<Parallel> {
        match &n.value {
            Value::Int(_) => {
                Some(Parallel::Count(
                    self.int(n, "`parallel`", 1..=MAX_PARALLEL as i64)? as u32,
                ))
            }
            Value::Map(m) => {
                self.check_keys(m, &["matrix"], "`parallel`");
                let rows = n.get("matrix")?;
                let Some(rows) = rows.as_seq() else {
                    self.err("`parallel: matrix` must be a list of mappings", rows.span);
                    return None;
                };
                let mut out = Vec::new();
                let mut total: usize = 0;
                for r in rows {
                    let Some(rm) = self.map(r, "a `matrix` entry") else {
                        continue;
                    };
                    let mut row = IndexMap::new();
                    let mut combos: usize = 1;
                    for (k, v) in rm {
                        let vals = self.strings(v, "a matrix value");
                        combos = combos.saturating_mul(vals.len().max(1));
                        row.insert(k.name.clone(), vals);
                    }
                    total = total.saturating_add(combos);
                    out.push(row);
                }
                if total > MAX_PARALLEL {
                    self.err_help(
                        format!("`parallel: matrix` makes {total} jobs, more than the limit of {MAX_PARALLEL}"),
                        n.span,
                        Some("split the matrix into several jobs".into()),
                    );
                    return None;
                }
                Some(Parallel::Matrix(out))
            }
            _ => {
                self.err(
                    format!(
                        "`parallel` must be a number or `matrix:`, not {}",
                        n.type_name()
                    ),
                    n.span,
                );
                None
            }
        }
    }

    fn artifacts(&mut self, n: &Node) -> Option<Artifacts> {
        let m = self.map(n, "`artifacts`")?;
        self.check_keys(m, keywords::ARTIFACTS, "`artifacts`");
        let mut a = Artifacts {
            name: n
                .get("name")
                .and_then(|x| self.string(x, "`artifacts: name`")),
            paths: n
                .get("paths")
                .map(|x| self.strings(x, "`artifacts: paths`"))
                .unwrap_or_default(),
            exclude: n
                .get("exclude")
                .map(|x| self.strings(x, "`artifacts: exclude`"))
                .unwrap_or_default(),
            expire_in: None,
            when: ArtifactsWhen::OnSuccess,
            untracked: n
                .get("untracked")
                .and_then(|x| self.bool(x, "`untracked`"))
                .unwrap_or(false),
            reports: Reports::default(),
        };
        if let Some(e) = n.get("expire_in")
            && e.as_str() != Some("never")
        {
            a.expire_in = self.duration(e, "`expire_in`");
        }
        if let Some(w) = n.get("when") {
            a.when = match w.as_str() {
                Some("on_success") => ArtifactsWhen::OnSuccess,
                Some("on_failure") => ArtifactsWhen::OnFailure,
                Some("always") => ArtifactsWhen::Always,
                _ => {
                    self.err(
                        "`artifacts: when` must be on_success, on_failure or always",
                        w.span,
                    );
                    ArtifactsWhen::OnSuccess
                }
            };
        }
        if let Some(r) = n.get("reports")
            && let Some(rm) = self.map(r, "`artifacts: reports`")
        {
            for (k, v) in rm {
                if !keywords::REPORTS.contains(&k.name.as_str()) {
                    let help =
                        did_you_mean(&k.name, keywords::REPORTS.iter().copied()).or_else(|| {
                            Some(format!(
                                "report types are: {}",
                                keywords::REPORTS.join(", ")
                            ))
                        });
                    self.diags.push(
                        Diagnostic::error(
                            format!("unknown report type `{}`", k.name),
                            Some(k.span),
                        )
                        .with_label("unknown report")
                        .with_help_opt(help),
                    );
                    continue;
                }
                let files = if k.name == "coverage_report" {
                    self.coverage_report(v)
                } else {
                    self.strings(v, "a report path")
                };
                match k.name.as_str() {
                    "junit" => a.reports.junit = files,
                    "dotenv" => a.reports.dotenv = files,
                    _ => a.reports.other.push((k.name.clone(), files)),
                }
            }
        }
        Some(a)
    }

    /// `coverage_report: {coverage_format: cobertura|jacoco, path: …}`: the report's path.
    fn coverage_report(&mut self, n: &Node) -> Vec<String> {
        let Some(m) = self.map(n, "`coverage_report`") else {
            return Vec::new();
        };
        self.check_keys(m, &["coverage_format", "path"], "`coverage_report`");
        match n
            .get("coverage_format")
            .and_then(|f| self.string(f, "`coverage_format`"))
        {
            Some(f) if matches!(f.as_str(), "cobertura" | "jacoco") => {}
            Some(f) => self.err_help(
                format!("unknown `coverage_format: {f}`"),
                n.get("coverage_format").map_or(n.span, |x| x.span),
                Some("use cobertura or jacoco".into()),
            ),
            None => self.err("`coverage_report` needs `coverage_format:`", n.span),
        }
        match n
            .get("path")
            .and_then(|p| self.string(p, "`coverage_report: path`"))
        {
            Some(p) => vec![p],
            None => {
                self.err("`coverage_report` needs `path:`", n.span);
                Vec::new()
            }
        }
    }

    fn cache(&mut self, n: &Node) -> Vec<Cache> {
        let items = self.flat_items(n, "`cache`");
        if items.len() > 4 {
            self.err_help(
                format!("a job may have at most 4 caches, not {}", items.len()),
                n.span,
                Some("merge caches that share a key".into()),
            );
        }
        let mut out = Vec::new();
        for it in items {
            let Some(m) = self.map(it, "`cache`") else {
                continue;
            };
            self.check_keys(m, keywords::CACHE, "`cache`");
            if let Some(p) = it.get("paths")
                && !matches!(p.value, Value::Seq(_) | Value::Null)
            {
                self.err_help(
                    format!("`cache: paths` must be a list, not {}", p.type_name()),
                    p.span,
                    Some("write `paths: [dir/]`".into()),
                );
            }
            let mut c = Cache {
                paths: it
                    .get("paths")
                    .map(|x| self.strings(x, "`cache: paths`"))
                    .unwrap_or_default(),
                policy: it
                    .get("policy")
                    .and_then(|x| self.string(x, "`cache: policy`")),
                when: it.get("when").and_then(|x| self.string(x, "`cache: when`")),
                untracked: it
                    .get("untracked")
                    .and_then(|x| self.bool(x, "`untracked`"))
                    .unwrap_or(false),
                unprotect: it
                    .get("unprotect")
                    .and_then(|x| self.bool(x, "`unprotect`"))
                    .unwrap_or(false),
                fallback_keys: it
                    .get("fallback_keys")
                    .map(|x| self.strings(x, "`cache: fallback_keys`"))
                    .unwrap_or_default(),
                ..Cache::default()
            };
            if c.fallback_keys.len() > 5
                && let Some(f) = it.get("fallback_keys")
            {
                self.err_help(
                    format!(
                        "`cache: fallback_keys` lists {} keys; GitLab allows at most 5",
                        c.fallback_keys.len()
                    ),
                    f.span,
                    None,
                );
            }
            if let Some(w) = &c.when
                && !matches!(w.as_str(), "on_success" | "on_failure" | "always")
            {
                let help = did_you_mean(w, ["on_success", "on_failure", "always"]);
                self.err_help(format!("unknown cache `when: {w}`"), it.span, help);
            }
            if let Some(p) = &c.policy
                && !matches!(p.as_str(), "pull" | "push" | "pull-push")
                && !p.contains('$')
            {
                let help = did_you_mean(p, ["pull", "push", "pull-push"]);
                self.err_help(format!("unknown cache policy `{p}`"), it.span, help);
            }
            if let Some(k) = it.get("key") {
                match &k.value {
                    Value::Map(km) => {
                        self.check_keys(km, &["files", "prefix"], "`cache: key`");
                        c.key_files = k
                            .get("files")
                            .map(|x| self.strings(x, "`key: files`"))
                            .unwrap_or_default();
                        if !(1..=2).contains(&c.key_files.len()) {
                            self.err_help(
                                format!(
                                    "`cache: key: files` lists {} files; it takes one or two",
                                    c.key_files.len()
                                ),
                                k.get("files").map_or(k.span, |f| f.span),
                                Some("the key is computed from the last commit that changed those files".into()),
                            );
                        }
                        c.key_prefix = k
                            .get("prefix")
                            .and_then(|x| self.string(x, "`key: prefix`"));
                    }
                    _ => c.key = self.string(k, "`cache: key`"),
                }
            }
            out.push(c);
        }
        out
    }

    fn image(&mut self, n: &Node) -> Option<Image> {
        match &n.value {
            Value::Str(s) => Some(Image {
                name: s.clone(),
                ..Image::default()
            }),
            Value::Map(m) => {
                self.check_keys(
                    m,
                    &["name", "entrypoint", "pull_policy", "docker", "kubernetes"],
                    "`image`",
                );
                Some(Image {
                    name: n
                        .get("name")
                        .and_then(|x| self.string(x, "`image: name`"))?,
                    entrypoint: n.get("entrypoint").map(|x| self.strings(x, "`entrypoint`")),
                    pull_policy: n
                        .get("pull_policy")
                        .map(|x| self.strings(x, "`pull_policy`"))
                        .unwrap_or_default(),
                })
            }
            _ => {
                self.err(
                    format!("`image` must be a name or a mapping, not {}", n.type_name()),
                    n.span,
                );
                None
            }
        }
    }

    fn services(&mut self, n: &Node) -> Vec<Service> {
        if n.as_seq().is_none() {
            self.err(
                format!("`services` must be a list, not {}", n.type_name()),
                n.span,
            );
            return Vec::new();
        }
        let items = self.flat_items(n, "`services`");
        let mut out = Vec::new();
        for it in items {
            match &it.value {
                Value::Str(s) => out.push(Service {
                    name: s.clone(),
                    ..Service::default()
                }),
                Value::Map(m) => {
                    self.check_keys(
                        m,
                        &[
                            "name",
                            "alias",
                            "entrypoint",
                            "command",
                            "variables",
                            "pull_policy",
                            "docker",
                            "kubernetes",
                        ],
                        "a service",
                    );
                    let Some(name) = it
                        .get("name")
                        .and_then(|x| self.string(x, "service `name`"))
                    else {
                        self.err("a service needs `name:`", it.span);
                        continue;
                    };
                    out.push(Service {
                        name,
                        alias: it.get("alias").and_then(|x| self.string(x, "`alias`")),
                        entrypoint: it
                            .get("entrypoint")
                            .map(|x| self.strings(x, "`entrypoint`")),
                        command: it.get("command").map(|x| self.strings(x, "`command`")),
                        variables: it
                            .get("variables")
                            .map(|v| self.variables(v, "service `variables`"))
                            .unwrap_or_default(),
                        pull_policy: it
                            .get("pull_policy")
                            .map(|x| self.strings(x, "`pull_policy`"))
                            .unwrap_or_default(),
                    });
                }
                _ => self.err(
                    format!(
                        "a service must be a name or a mapping, not {}",
                        it.type_name()
                    ),
                    it.span,
                ),
            }
        }
        out
    }

    fn environment(&mut self, n: &Node) -> Option<Environment> {
        match &n.value {
            Value::Str(s) => Some(Environment {
                name: s.clone(),
                ..Environment::default()
            }),
            Value::Map(m) => {
                self.check_keys(
                    m,
                    &[
                        "name",
                        "url",
                        "action",
                        "on_stop",
                        "auto_stop_in",
                        "deployment_tier",
                        "kubernetes",
                    ],
                    "`environment`",
                );
                Some(Environment {
                    name: n
                        .get("name")
                        .and_then(|x| self.string(x, "environment `name`"))?,
                    url: n.get("url").and_then(|x| self.string(x, "`url`")),
                    action: n.get("action").and_then(|x| self.string(x, "`action`")),
                    on_stop: n.get("on_stop").and_then(|x| self.string(x, "`on_stop`")),
                })
            }
            _ => {
                self.err(
                    format!(
                        "`environment` must be a name or a mapping, not {}",
                        n.type_name()
                    ),
                    n.span,
                );
                None
            }
        }
    }

    fn resources(&mut self, n: &Node) -> Resources {
        let mut r = Resources {
            span: Some(n.span),
            ..Resources::default()
        };
        let Some(m) = self.map(n, "`resources`") else {
            return r;
        };
        self.check_keys(m, keywords::RESOURCES, "`resources`");
        if let Some(mem) = n.get("memory").and_then(|x| x.scalar_string()) {
            match units::parse_memory(&mem) {
                Ok(b) => r.memory_bytes = Some(b),
                Err(e) => self.err(e, n.get("memory").map_or(n.span, |x| x.span)),
            }
        }
        if let Some(c) = n.get("cpus").and_then(|x| x.scalar_string()) {
            match units::parse_cpus(&c) {
                Ok(v) => r.cpus = Some(v),
                Err(e) => self.err(e, n.get("cpus").map_or(n.span, |x| x.span)),
            }
        }
        r
    }

    fn only_except(&mut self, key: &Key, n: &Node) -> Option<OnlyExcept> {
        self.warn(
            format!("`{}` is deprecated", key.name),
            key.span,
            "use `rules:` instead; rave still honours `only`/`except` refs, variables and changes",
        );
        let mut oe = OnlyExcept::default();
        match &n.value {
            Value::Map(m) => {
                self.check_keys(
                    m,
                    &["refs", "variables", "changes", "kubernetes"],
                    &format!("`{}`", key.name),
                );
                oe.refs = n
                    .get("refs")
                    .map(|x| self.strings(x, "`refs`"))
                    .unwrap_or_default();
                if let Some(v) = n.get("variables") {
                    let exprs = match &v.value {
                        Value::Seq(items) => items.iter().collect::<Vec<_>>(),
                        _ => vec![v],
                    };
                    oe.variables = exprs.into_iter().filter_map(|e| self.expr(e)).collect();
                }
                oe.changes = n
                    .get("changes")
                    .map(|x| self.strings(x, "`changes`"))
                    .unwrap_or_default();
            }
            _ => oe.refs = self.strings(n, &format!("`{}`", key.name)),
        }
        Some(oe)
    }

    pub fn rave(&mut self, n: &Node) -> RaveConfig {
        let mut cfg = RaveConfig {
            span: Some(n.span),
            ..RaveConfig::default()
        };
        let Some(m) = self.map(n, "`.rave`") else {
            return cfg;
        };
        self.check_keys(m, keywords::RAVE, "`.rave`");
        cfg.profile = n.get("profile").and_then(|x| self.string(x, "`profile`"));
        cfg.executor = n.get("executor").and_then(|x| self.string(x, "`executor`"));
        if let Some(e) = &cfg.executor
            && !matches!(e.as_str(), "local" | "docker")
        {
            let help = did_you_mean(e, ["local", "docker"]);
            self.err_help(
                format!("unknown executor `{e}`"),
                n.get("executor").map_or(n.span, |x| x.span),
                help,
            );
        }
        cfg.default_image = n
            .get("default_image")
            .and_then(|x| self.string(x, "`default_image`"));
        cfg.nix_single_user = n
            .get("nix_single_user")
            .and_then(|x| self.bool(x, "`nix_single_user`"))
            .unwrap_or(false);
        if let Some(d) = n.get("defaults") {
            let r = self.resources(d);
            if let Some(m) = r.memory_bytes {
                cfg.default_memory_bytes = m;
            }
            if let Some(c) = r.cpus {
                cfg.default_cpus = c;
            }
        }
        if let Some(p) = n.get("profiles")
            && let Some(pm) = self.map(p, "`profiles`")
        {
            for (name, body) in pm {
                let base = cfg
                    .profiles
                    .get(&name.name)
                    .copied()
                    .unwrap_or(Budget::SAFE);
                if let Some(b) = self.profile(body, base) {
                    cfg.profiles.insert(name.name.clone(), b);
                }
            }
        }
        if let Some(p) = &cfg.profile
            && !cfg.profiles.contains_key(p)
        {
            let help = did_you_mean(p, cfg.profiles.keys().map(String::as_str));
            self.err_help(
                format!("profile `{p}` is not defined"),
                n.get("profile").map_or(n.span, |x| x.span),
                help,
            );
        }
        cfg
    }

    fn profile(&mut self, n: &Node, base: Budget) -> Option<Budget> {
        let m = self.map(n, "a profile")?;
        self.check_keys(m, keywords::PROFILE, "a profile");
        let mut b = base;
        if let Some(x) = n.get("memory") {
            match x.scalar_string().map(|s| units::parse_memory(&s)) {
                Some(Ok(v)) => b.memory_bytes = v,
                Some(Err(e)) => self.err(e, x.span),
                None => self.err("`memory` must be a size such as 3G", x.span),
            }
        }
        if let Some(x) = n.get("cpus") {
            match x.scalar_string().map(|s| units::parse_cpus(&s)) {
                Some(Ok(v)) => b.cpus = v,
                Some(Err(e)) => self.err(e, x.span),
                None => self.err("`cpus` must be a number", x.span),
            }
        }
        if let Some(x) = n.get("jobs") {
            b.jobs = self.int(x, "`jobs`", 1..=4096)? as u32;
        }
        if let Some(x) = n.get("nix_cores") {
            b.nix_cores = self.int(x, "`nix_cores`", 0..=4096)? as u32;
        }
        if let Some(x) = n.get("nix_max_jobs") {
            b.nix_max_jobs = self.int(x, "`nix_max_jobs`", 1..=4096)? as u32;
        }
        Some(b)
    }

    /// Read one job. `stages` is the declared stage list, for "unknown stage" errors.
    pub fn job(&mut self, key: &Key, n: &Node, stages: &[String]) -> Option<Job> {
        let m = self.map(n, &format!("job `{}`", key.name))?;
        self.check_keys(m, keywords::JOB, &format!("job `{}`", key.name));
        let mut script = n
            .get("script")
            .map(|s| self.script(s, "`script`"))
            .unwrap_or_default();
        let mut trigger = None;
        if let Some(t) = n.get("trigger") {
            if n.get("script").is_some() {
                self.err_help(
                    format!("job `{}` has both `script` and `trigger`", key.name),
                    t.span,
                    Some(
                        "a trigger job runs a child pipeline instead of a script; keep one".into(),
                    ),
                );
            }
            let yaml_variables: Vec<String> = n
                .get("variables")
                .and_then(Node::as_map)
                .map(|m| m.iter().map(|(k, _)| k.name.clone()).collect())
                .unwrap_or_default();
            if let Some((spec, run)) = crate::child::read(&key.name, t, &yaml_variables, self.diags)
            {
                trigger = Some(spec);
                script = run;
            }
        }
        if let Some(sn) = n.get("script")
            && script.iter().all(|l| l.trim().is_empty())
        {
            // GitLab: "script can't be blank".
            self.err_help(
                format!("job `{}` has an empty `script`", key.name),
                sn.span,
                Some("add the commands to run; a job must run at least one".into()),
            );
        }
        if n.get("script").is_none() && n.get("trigger").is_none() {
            self.err_help(
                format!("job `{}` has no `script`", key.name),
                key.span,
                Some("add `script:` with the commands to run, or start the name with `.` to make it a template".into()),
            );
        }
        let stage = match n.get("stage") {
            Some(s) => {
                let name = self.string(s, "`stage`").unwrap_or_default();
                if !stages.contains(&name) {
                    let help = did_you_mean(&name, stages.iter().map(String::as_str))
                        .or_else(|| Some(format!("declared stages are: {}", stages.join(", "))));
                    self.diags.push(
                        Diagnostic::error(
                            format!(
                                "job `{}` is in stage `{name}`, which is not in `stages:`",
                                key.name
                            ),
                            Some(s.span),
                        )
                        .with_label("unknown stage")
                        .with_help_opt(help)
                        .follow_on(),
                    );
                }
                Spanned {
                    value: name,
                    span: s.span,
                }
            }
            None => Spanned {
                value: "test".into(),
                span: key.span,
            },
        };
        if n.get("stage").is_none() && !stages.iter().any(|s| s == "test") {
            self.err_help(
                format!(
                    "job `{}` has no `stage`, and the default stage `test` is not in `stages:`",
                    key.name
                ),
                key.span,
                Some("add `stage:` to the job".into()),
            );
        }
        let when = n.get("when").and_then(|w| self.when(w)).unwrap_or_default();
        if when == When::Never {
            self.err_help(
                "`when: never` is only valid inside `rules`",
                n.get("when").map_or(key.span, |w| w.span),
                Some("a job's own `when` is one of on_success, on_failure, always, manual, delayed; write `rules: [{when: never}]` to leave the job out".into()),
            );
        }
        if let (Some(_), Some(si)) = (n.get("rules"), n.get("start_in")) {
            self.err_help(
                "`start_in` cannot be used with `rules`",
                si.span,
                Some("put `when: delayed` and `start_in` in the rule instead".into()),
            );
        }
        let start_in = n
            .get("start_in")
            .and_then(|d| self.duration(d, "`start_in`"));
        if when == When::Delayed && start_in.is_none() {
            self.err_help(
                "`when: delayed` needs `start_in`",
                key.span,
                Some("add e.g. `start_in: 5 minutes`".into()),
            );
        }
        let rules = n.get("rules").map(|r| self.rules(r, keywords::RULE));
        let only = m
            .iter()
            .find(|(k, _)| k.name == "only")
            .and_then(|(k, v)| self.only_except(k, v));
        let except = m
            .iter()
            .find(|(k, _)| k.name == "except")
            .and_then(|(k, v)| self.only_except(k, v));
        if rules.is_some() && (only.is_some() || except.is_some()) {
            self.err_help(
                format!("job `{}` uses both `rules` and `only`/`except`", key.name),
                key.span,
                Some("GitLab rejects this combination; keep `rules`".into()),
            );
        }
        let inherit_variables = match n.get("inherit") {
            Some(i) => {
                if let Some(im) = self.map(i, "`inherit`") {
                    self.check_keys(im, &["default", "variables"], "`inherit`");
                }
                match i.get("variables").map(|v| &v.value) {
                    Some(Value::Bool(false)) => InheritVariables::None,
                    Some(Value::Seq(_)) => InheritVariables::Only(
                        i.get("variables")
                            .map(|v| self.strings(v, "`inherit: variables`"))
                            .unwrap_or_default(),
                    ),
                    _ => InheritVariables::All,
                }
            }
            None => InheritVariables::All,
        };
        let dependencies = n.get("dependencies").map(|d| match d.as_seq() {
            Some(items) => items
                .iter()
                .filter_map(|i| {
                    self.string(i, "a dependency").map(|v| Spanned {
                        value: v,
                        span: i.span,
                    })
                })
                .collect(),
            None => {
                self.err("`dependencies` must be a list of job names", d.span);
                Vec::new()
            }
        });
        Some(Job {
            name: key.name.clone(),
            span: key.span,
            stage,
            before_script: n
                .get("before_script")
                .map(|s| self.script(s, "`before_script`"))
                .unwrap_or_default(),
            script,
            after_script: n
                .get("after_script")
                .map(|s| self.script(s, "`after_script`"))
                .unwrap_or_default(),
            needs: n.get("needs").and_then(|x| self.needs(x)),
            dependencies,
            variables: n
                .get("variables")
                .map(|v| self.variables(v, "job `variables`"))
                .unwrap_or_default(),
            inherit_variables,
            rules,
            only,
            except,
            when,
            start_in,
            allow_failure: n.get("allow_failure").and_then(|a| self.allow_failure(a)),
            retry: n.get("retry").and_then(|r| self.retry(r)),
            timeout: n.get("timeout").and_then(|t| self.duration(t, "`timeout`")),
            parallel: n.get("parallel").and_then(|p| self.parallel(p)),
            artifacts: n.get("artifacts").and_then(|a| self.artifacts(a)),
            cache: n.get("cache").map(|c| self.cache(c)).unwrap_or_default(),
            image: n.get("image").and_then(|i| self.image(i)),
            services: n
                .get("services")
                .map(|s| self.services(s))
                .unwrap_or_default(),
            resource_group: n
                .get("resource_group")
                .and_then(|r| self.string(r, "`resource_group`")),
            environment: n.get("environment").and_then(|e| self.environment(e)),
            interruptible: n
                .get("interruptible")
                .and_then(|i| self.bool(i, "`interruptible`"))
                .unwrap_or(false),
            tags: n
                .get("tags")
                .map(|t| self.strings(t, "`tags`"))
                .unwrap_or_default(),
            coverage: n.get("coverage").and_then(|c| self.string(c, "`coverage`")),
            resources: n
                .get("resources")
                .map(|r| self.resources(r))
                .unwrap_or_default(),
            trigger,
        })
        .map(|mut job| {
            // A trigger job runs no script of its own (GitLab's bridge jobs take no image):
            // it starts the child run on this machine, whatever `default: image` says.
            if job.trigger.is_some() {
                job.image = None;
                job.services.clear();
            }
            job
        })
    }

    pub fn workflow(&mut self, n: &Node) -> Option<Workflow> {
        let m = self.map(n, "`workflow`")?;
        self.check_keys(m, &["rules", "name", "auto_cancel"], "`workflow`");
        Some(Workflow {
            name: n
                .get("name")
                .and_then(|x| self.string(x, "`workflow: name`")),
            rules: n
                .get("rules")
                .map(|r| self.rules(r, keywords::WORKFLOW_RULE))
                .unwrap_or_default(),
        })
    }

    pub fn stages(&mut self, n: &Node) -> Vec<Spanned<String>> {
        let Some(items) = n.as_seq() else {
            self.err(
                format!("`stages` must be a list, not {}", n.type_name()),
                n.span,
            );
            return Vec::new();
        };
        let mut out: Vec<Spanned<String>> = Vec::new();
        for i in items {
            if let Some(s) = self.string(i, "a stage") {
                if out.iter().any(|o| o.value == s) {
                    self.err(format!("stage `{s}` is listed twice"), i.span);
                    continue;
                }
                out.push(Spanned {
                    value: s,
                    span: i.span,
                });
            }
        }
        out
    }
}
