//! `rules:`, `workflow: rules:` and legacy `only`/`except`, evaluated for one trigger.

use globset::{GlobBuilder, GlobMatcher};
use rave_model::{AllowFailure, Changes, Need, OnlyExcept, Rule, Variables, When};

use crate::trigger::{Source, Trigger};

/// What the first matching rule decided.
#[derive(Clone, Debug, Default)]
pub struct RuleOutcome {
    pub when: Option<When>,
    pub allow_failure: Option<AllowFailure>,
    pub variables: Variables,
    pub needs: Option<Vec<Need>>,
    pub start_in: Option<std::time::Duration>,
}

/// Context a rule is evaluated in.
pub struct RuleEnv<'a> {
    pub trigger: &'a Trigger,
    pub lookup: &'a dyn Fn(&str) -> Option<String>,
}

fn glob(pattern: &str) -> Option<GlobMatcher> {
    // GitLab matches `changes`/`exists` patterns with File.fnmatch and FNM_PATHNAME|FNM_EXTGLOB:
    // `*` stays within a directory, `**` crosses them, `{a,b}` alternates.
    GlobBuilder::new(pattern.trim_start_matches("./").trim_start_matches('/'))
        .literal_separator(true)
        .build()
        .ok()
        .map(|g| g.compile_matcher())
}

fn any_match(patterns: &[String], files: &[String], env: &RuleEnv<'_>) -> bool {
    patterns.iter().any(|p| {
        let p = rave_model::vars::expand(p, env.lookup);
        match glob(&p) {
            Some(g) => files.iter().any(|f| g.is_match(f)),
            None => false,
        }
    })
}

fn changes_match(c: &Changes, env: &RuleEnv<'_>) -> bool {
    match &env.trigger.changed_files {
        Some(files) => any_match(&c.paths, files, env),
        None => true,
    }
}

/// A rule that cannot be evaluated (a variable holding something that is not a regex).
#[derive(Clone, Debug)]
pub struct RuleError {
    pub message: String,
    pub span: rave_model::Span,
}

impl RuleEnv<'_> {
    pub fn rule_matches(&self, r: &Rule) -> Result<bool, RuleError> {
        if let Some((src, e)) = &r.if_ {
            let ok = e.eval_checked(self.lookup).map_err(|m| RuleError {
                message: format!("`if: {src}`: {m}"),
                span: r.span,
            })?;
            if !ok {
                return Ok(false);
            }
        }
        if let Some(c) = &r.changes
            && !changes_match(c, self)
        {
            return Ok(false);
        }
        if let Some(ex) = &r.exists
            && !any_match(ex, &self.trigger.files, self)
        {
            return Ok(false);
        }
        Ok(true)
    }

    /// The first matching rule's outcome, or None when no rule matches (the job is excluded).
    pub fn evaluate(&self, rules: &[Rule]) -> Result<Option<RuleOutcome>, RuleError> {
        for r in rules {
            if self.rule_matches(r)? {
                return Ok(Some(RuleOutcome {
                    when: r.when,
                    allow_failure: r.allow_failure.clone(),
                    variables: r.variables.clone(),
                    needs: r.needs.clone(),
                    start_in: r.start_in,
                }));
            }
        }
        Ok(None)
    }

    fn ref_matches(&self, refs: &[String]) -> bool {
        let project = self.trigger.project_path();
        refs.iter().any(|r| {
            // `master@group/project` limits the entry to one project (forks run the same file);
            // GitLab splits at the first `@`, even inside a regex.
            let r = match r.split_once('@') {
                Some((pattern, path)) if path == project => pattern,
                Some(_) => return false,
                None => r.as_str(),
            };
            self.ref_matches_one(r)
        })
    }

    fn ref_matches_one(&self, r: &str) -> bool {
        let t = self.trigger;
        match r {
            "branches" => t.tag.is_none(),
            "tags" => t.tag.is_some(),
            "pushes" => matches!(t.source, Source::Push | Source::Local),
            "web" => t.source == Source::Web,
            "api" => t.source == Source::Api,
            "schedules" => t.source == Source::Schedule,
            "triggers" => t.source == Source::Trigger,
            "merge_requests" | "external_pull_requests" | "chat" | "external" => false,
            pattern if pattern.starts_with('/') => {
                rave_model::expr::parse(&format!("$R =~ {pattern}"))
                    .map(|e| e.eval(&|_| Some(t.ref_name.clone())))
                    .unwrap_or(false)
            }
            name => name == t.ref_name,
        }
    }

    fn only_except_matches(&self, oe: &OnlyExcept) -> bool {
        (oe.refs.is_empty() || self.ref_matches(&oe.refs))
            && (oe.variables.is_empty() || oe.variables.iter().any(|(_, e)| e.eval(self.lookup)))
            && (oe.changes.is_empty()
                || self
                    .trigger
                    .changed_files
                    .as_ref()
                    .is_none_or(|f| any_match(&oe.changes, f, self)))
    }

    /// Legacy filters: included unless `only` fails or `except` matches. Without either,
    /// GitLab's default is `only: [branches, tags]`, which every rave pipeline satisfies.
    pub fn only_except(&self, only: Option<&OnlyExcept>, except: Option<&OnlyExcept>) -> bool {
        only.is_none_or(|o| self.only_except_matches(o))
            && except.is_none_or(|e| !self.only_except_matches(e))
    }
}
