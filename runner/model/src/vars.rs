//! `$VAR` / `${VAR}` expansion with GitLab's rules: `$$` is a literal `$`, unknown variables
//! expand to nothing, and expansion is not recursive beyond what the caller asks for.

/// Expand `$VAR` and `${VAR}` in `s`. `lookup` returns None for unset variables, which expand
/// to nothing.
pub fn expand(s: &str, lookup: &dyn Fn(&str) -> Option<String>) -> String {
    expand_with(s, lookup, false)
}

/// Expand, leaving references to unset variables as written. The planner uses this: variables
/// such as `CI_PROJECT_DIR` or `CI_JOB_ID` only exist when the job starts, and are expanded then.
pub fn expand_known(s: &str, lookup: &dyn Fn(&str) -> Option<String>) -> String {
    expand_with(s, lookup, true)
}

fn expand_with(s: &str, lookup: &dyn Fn(&str) -> Option<String>, keep_unknown: bool) -> String {
    if !s.contains('$') {
        return s.to_string();
    }
    let b = s.as_bytes();
    let mut out = String::with_capacity(s.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] != b'$' {
            let ch = s[i..].chars().next().unwrap_or('\0');
            out.push(ch);
            i += ch.len_utf8();
            continue;
        }
        if b.get(i + 1) == Some(&b'$') {
            // A later expansion pass must see the escape again.
            out.push_str(if keep_unknown { "$$" } else { "$" });
            i += 2;
            continue;
        }
        let braced = b.get(i + 1) == Some(&b'{');
        let start = if braced { i + 2 } else { i + 1 };
        let mut end = start;
        while end < b.len() && (b[end].is_ascii_alphanumeric() || b[end] == b'_') {
            end += 1;
        }
        if end == start || (braced && b.get(end) != Some(&b'}')) {
            out.push('$');
            i += 1;
            continue;
        }
        let next = if braced { end + 1 } else { end };
        match lookup(&s[start..end]) {
            Some(v) => out.push_str(&v),
            None if keep_unknown => out.push_str(&s[i..next]),
            None => {}
        }
        i = next;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn x(s: &str) -> String {
        expand(s, &|n| match n {
            "A" => Some("1".into()),
            "EMPTY" => Some(String::new()),
            _ => None,
        })
    }

    #[test]
    fn expands_both_forms_and_escapes() {
        assert_eq!(x("a-$A-${A}b"), "a-1-1b");
        assert_eq!(x("$$A"), "$A");
        assert_eq!(x("$MISSING|$EMPTY|"), "||");
        assert_eq!(x("cost: 5$"), "cost: 5$");
        assert_eq!(x("${A"), "${A");
        assert_eq!(x("ünï$A"), "ünï1");
    }

    #[test]
    fn known_only_keeps_runtime_variables_for_later() {
        let k = |s: &str| expand_known(s, &|n| (n == "A").then(|| "1".to_string()));
        assert_eq!(k("$A/${LATER}/$LATER/$$A"), "1/${LATER}/$LATER/$$A");
    }
}
