//! `$VAR` / `${VAR}` expansion with GitLab's rules: `$$` is a literal `$`, unknown variables
//! expand to nothing, and expansion is not recursive beyond what the caller asks for.

/// Expand `$VAR` and `${VAR}` in `s`. `lookup` returns None for unset variables.
pub fn expand(s: &str, lookup: &dyn Fn(&str) -> Option<String>) -> String {
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
            out.push('$');
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
        out.push_str(&lookup(&s[start..end]).unwrap_or_default());
        i = if braced { end + 1 } else { end };
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
}
