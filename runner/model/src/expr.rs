//! GitLab's CI/CD expression language, as used by `rules: if` and `workflow: rules: if`.
//!
//! Grammar (precedence low → high): `a || b`, `a && b`, comparisons (`==`, `!=`, `=~`, `!~`),
//! then operands: `$VAR` / `${VAR}`, `"str"` / `'str'`, `null`, `/regex/flags`, `( … )`.
//! A bare `$VAR` is true when the variable is set and non-empty. An unset variable equals
//! `null`; a set-but-empty one equals `""`. Regexes use RE2 syntax in GitLab; the `regex` crate
//! implements the same family, so patterns behave the same.

use std::fmt;

use regex::Regex;

#[derive(Clone, Debug, PartialEq)]
pub enum Operand {
    Var(String),
    Str(String),
    Null,
    Regex { pattern: String, flags: String },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CmpOp {
    Eq,
    Ne,
    Match,
    NoMatch,
}

#[derive(Clone, Debug, PartialEq)]
pub enum Expr {
    Operand(Operand),
    Cmp(Operand, CmpOp, Operand),
    And(Box<Expr>, Box<Expr>),
    Or(Box<Expr>, Box<Expr>),
}

/// A syntax error at a byte offset inside the expression.
#[derive(Clone, Debug, PartialEq)]
pub struct ExprError {
    pub offset: usize,
    pub message: String,
}

impl fmt::Display for ExprError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} (at character {})", self.message, self.offset + 1)
    }
}

#[derive(Clone, Debug, PartialEq)]
enum Tok {
    Operand(Operand),
    Op(CmpOp),
    And,
    Or,
    LParen,
    RParen,
}

const MAX_DEPTH: usize = 64;

fn lex(src: &str) -> Result<Vec<(usize, Tok)>, ExprError> {
    let b = src.as_bytes();
    let mut i = 0;
    let mut out = Vec::new();
    let err = |offset: usize, message: &str| ExprError {
        offset,
        message: message.to_string(),
    };
    while i < b.len() {
        let c = b[i];
        let start = i;
        match c {
            b' ' | b'\t' | b'\n' | b'\r' => {
                i += 1;
                continue;
            }
            b'(' => {
                out.push((start, Tok::LParen));
                i += 1;
            }
            b')' => {
                out.push((start, Tok::RParen));
                i += 1;
            }
            b'&' if b.get(i + 1) == Some(&b'&') => {
                out.push((start, Tok::And));
                i += 2;
            }
            b'|' if b.get(i + 1) == Some(&b'|') => {
                out.push((start, Tok::Or));
                i += 2;
            }
            b'=' if b.get(i + 1) == Some(&b'=') => {
                out.push((start, Tok::Op(CmpOp::Eq)));
                i += 2;
            }
            b'=' if b.get(i + 1) == Some(&b'~') => {
                out.push((start, Tok::Op(CmpOp::Match)));
                i += 2;
            }
            b'!' if b.get(i + 1) == Some(&b'=') => {
                out.push((start, Tok::Op(CmpOp::Ne)));
                i += 2;
            }
            b'!' if b.get(i + 1) == Some(&b'~') => {
                out.push((start, Tok::Op(CmpOp::NoMatch)));
                i += 2;
            }
            b'$' => {
                i += 1;
                if b.get(i) == Some(&b'{') {
                    // GitLab's expression lexer knows only `$NAME`.
                    return Err(err(start, "`${VAR}` is not valid in `if`: write `$VAR`"));
                }
                let braced = false;
                let name_start = i;
                while i < b.len() && (b[i].is_ascii_alphanumeric() || b[i] == b'_') {
                    i += 1;
                }
                if i == name_start {
                    return Err(err(start, "`$` must be followed by a variable name"));
                }
                let name = src[name_start..i].to_string();
                if braced {
                    if b.get(i) != Some(&b'}') {
                        return Err(err(start, "unclosed `${`"));
                    }
                    i += 1;
                }
                out.push((start, Tok::Operand(Operand::Var(name))));
            }
            b'"' | b'\'' => {
                i += 1;
                let s = i;
                while i < b.len() && b[i] != c {
                    i += 1;
                }
                if i >= b.len() {
                    return Err(err(start, "unterminated string"));
                }
                out.push((start, Tok::Operand(Operand::Str(src[s..i].to_string()))));
                i += 1;
            }
            b'/' => {
                i += 1;
                let mut pattern = String::new();
                loop {
                    match b.get(i) {
                        None => return Err(err(start, "unterminated regular expression")),
                        Some(b'\\') if b.get(i + 1) == Some(&b'/') => {
                            pattern.push('/');
                            i += 2;
                        }
                        Some(b'/') => break,
                        Some(_) => {
                            let ch = src[i..].chars().next().unwrap_or('\0');
                            pattern.push(ch);
                            i += ch.len_utf8();
                        }
                    }
                }
                i += 1;
                let fs = i;
                while i < b.len() && b[i].is_ascii_alphabetic() {
                    i += 1;
                }
                let flags = src[fs..i].to_string();
                if let Some(bad) = flags.chars().find(|f| !matches!(f, 'i' | 'm' | 's' | 'x')) {
                    return Err(err(fs, &format!("unknown regex flag `{bad}`")));
                }
                compile(&pattern, &flags).map_err(|e| err(start, &e))?;
                out.push((start, Tok::Operand(Operand::Regex { pattern, flags })));
            }
            _ if src[i..].starts_with("null") => {
                out.push((start, Tok::Operand(Operand::Null)));
                i += 4;
            }
            _ => {
                let ch = src[i..].chars().next().unwrap_or('?');
                return Err(err(start, &format!("unexpected `{ch}`")));
            }
        }
    }
    Ok(out)
}

fn compile(pattern: &str, flags: &str) -> Result<Regex, String> {
    let full = if flags.is_empty() {
        pattern.to_string()
    } else {
        format!("(?{flags}){pattern}")
    };
    regex::RegexBuilder::new(&full)
        .size_limit(1 << 20)
        .build()
        .map_err(|e| format!("invalid regular expression /{pattern}/: {e}"))
}

struct P {
    toks: Vec<(usize, Tok)>,
    pos: usize,
    len: usize,
    depth: usize,
}

impl P {
    fn peek(&self) -> Option<&Tok> {
        self.toks.get(self.pos).map(|(_, t)| t)
    }
    fn offset(&self) -> usize {
        self.toks.get(self.pos).map(|(o, _)| *o).unwrap_or(self.len)
    }
    fn or(&mut self) -> Result<Expr, ExprError> {
        let mut left = self.and()?;
        while self.peek() == Some(&Tok::Or) {
            self.pos += 1;
            let right = self.and()?;
            left = Expr::Or(Box::new(left), Box::new(right));
        }
        Ok(left)
    }
    fn and(&mut self) -> Result<Expr, ExprError> {
        let mut left = self.primary()?;
        while self.peek() == Some(&Tok::And) {
            self.pos += 1;
            let right = self.primary()?;
            left = Expr::And(Box::new(left), Box::new(right));
        }
        Ok(left)
    }
    fn primary(&mut self) -> Result<Expr, ExprError> {
        let offset = self.offset();
        match self.toks.get(self.pos).map(|(_, t)| t.clone()) {
            Some(Tok::LParen) => {
                self.depth += 1;
                if self.depth > MAX_DEPTH {
                    return Err(ExprError {
                        offset,
                        message: "parentheses nested too deeply".into(),
                    });
                }
                self.pos += 1;
                let e = self.or()?;
                if self.peek() != Some(&Tok::RParen) {
                    return Err(ExprError {
                        offset: self.offset(),
                        message: "expected `)`".into(),
                    });
                }
                self.pos += 1;
                self.depth -= 1;
                Ok(e)
            }
            Some(Tok::Operand(left)) => {
                self.pos += 1;
                if let Some(Tok::Op(op)) = self.peek().cloned() {
                    self.pos += 1;
                    let roff = self.offset();
                    match self.toks.get(self.pos).map(|(_, t)| t.clone()) {
                        Some(Tok::Operand(right)) => {
                            self.pos += 1;
                            if matches!(op, CmpOp::Match | CmpOp::NoMatch)
                                && matches!(right, Operand::Str(_) | Operand::Null)
                            {
                                return Err(ExprError {
                                    offset: roff,
                                    message: "the right side of `=~` / `!~` must be a /regex/ or a variable holding one".into(),
                                });
                            }
                            Ok(Expr::Cmp(left, op, right))
                        }
                        _ => Err(ExprError {
                            offset: roff,
                            message: "expected a value after the comparison".into(),
                        }),
                    }
                } else {
                    Ok(Expr::Operand(left))
                }
            }
            Some(_) => Err(ExprError {
                offset,
                message: "expected a variable, string, regex, `null` or `(`".into(),
            }),
            None => Err(ExprError {
                offset,
                message: "expression ends too early".into(),
            }),
        }
    }
}

/// Parse an expression.
pub fn parse(src: &str) -> Result<Expr, ExprError> {
    let toks = lex(src)?;
    let mut p = P {
        toks,
        pos: 0,
        len: src.len(),
        depth: 0,
    };
    let e = p.or()?;
    if p.pos != p.toks.len() {
        return Err(ExprError {
            offset: p.offset(),
            message: "expected `&&`, `||` or the end of the expression".into(),
        });
    }
    Ok(e)
}

#[derive(Debug, PartialEq)]
enum Val {
    Null,
    Str(String),
    Regex(String, String),
}

fn value(op: &Operand, lookup: &dyn Fn(&str) -> Option<String>) -> Val {
    match op {
        Operand::Var(n) => lookup(n).map_or(Val::Null, Val::Str),
        Operand::Str(s) => Val::Str(s.clone()),
        Operand::Null => Val::Null,
        Operand::Regex { pattern, flags } => Val::Regex(pattern.clone(), flags.clone()),
    }
}

/// A string that holds `/pattern/flags` counts as a regex on the right of `=~`, as in GitLab.
/// Unset (null) matches nothing; a string that is not a `/regex/`, or does not compile, is an
/// error rather than a silent "no match" (which would make `!~` silently true).
fn as_regex(v: Val) -> Result<Option<Regex>, String> {
    match v {
        Val::Regex(p, f) => compile(&p, &f).map(Some),
        Val::Str(s) => {
            let parsed = s
                .strip_prefix('/')
                .and_then(|rest| rest.rfind('/').map(|end| (&rest[..end], &rest[end + 1..])));
            match parsed {
                Some((pattern, flags))
                    if flags.chars().all(|f| matches!(f, 'i' | 'm' | 's' | 'x')) =>
                {
                    compile(pattern, flags).map(Some)
                }
                _ => Err(format!(
                    "the variable on the right of `=~`/`!~` holds `{s}`, which is not a `/regex/`"
                )),
            }
        }
        Val::Null => Ok(None),
    }
}

impl Expr {
    /// Evaluate with variables looked up by `lookup` (None = unset). A regex held in a
    /// variable that is not one counts as no match here; see [`Expr::eval_checked`].
    pub fn eval(&self, lookup: &dyn Fn(&str) -> Option<String>) -> bool {
        self.eval_checked(lookup).unwrap_or(false)
    }

    /// Evaluate, failing when a variable on the right of `=~`/`!~` does not hold a valid regex.
    pub fn eval_checked(&self, lookup: &dyn Fn(&str) -> Option<String>) -> Result<bool, String> {
        Ok(match self {
            Expr::Or(a, b) => a.eval_checked(lookup)? || b.eval_checked(lookup)?,
            Expr::And(a, b) => a.eval_checked(lookup)? && b.eval_checked(lookup)?,
            Expr::Operand(o) => match value(o, lookup) {
                Val::Null => false,
                Val::Str(s) => !s.is_empty(),
                Val::Regex(..) => true,
            },
            Expr::Cmp(l, op, r) => {
                let lv = value(l, lookup);
                let rv = value(r, lookup);
                match op {
                    CmpOp::Eq => lv == rv,
                    CmpOp::Ne => lv != rv,
                    CmpOp::Match | CmpOp::NoMatch => {
                        let matched = match (lv, as_regex(rv)?) {
                            (Val::Str(s), Some(re)) => re.is_match(&s),
                            _ => false,
                        };
                        matched == (*op == CmpOp::Match)
                    }
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(src: &str, vars: &[(&str, &str)]) -> bool {
        let e = parse(src).unwrap_or_else(|e| panic!("{src}: {e}"));
        e.eval(&|n| {
            vars.iter()
                .find(|(k, _)| *k == n)
                .map(|(_, v)| v.to_string())
        })
    }

    #[test]
    fn equality_and_null() {
        assert!(ev("$A == \"x\"", &[("A", "x")]));
        assert!(ev("$A != 'y'", &[("A", "x")]));
        assert!(ev("$B == null", &[("A", "x")]));
        assert!(!ev("$A == null", &[("A", "")]));
        assert!(ev("$A == \"\"", &[("A", "")]));
        assert!(ev("$A == $B", &[("A", "1"), ("B", "1")]));
        assert!(
            parse("${A} == \"x\"")
                .unwrap_err()
                .message
                .contains("write `$VAR`")
        );
    }

    #[test]
    fn presence() {
        assert!(ev("$A", &[("A", "x")]));
        assert!(!ev("$A", &[("A", "")]));
        assert!(!ev("$A", &[]));
    }

    #[test]
    fn regex_with_flags_and_variables() {
        assert!(ev(
            "$CI_COMMIT_TAG =~ /^v\\d+/",
            &[("CI_COMMIT_TAG", "v1.2")]
        ));
        assert!(ev("$B =~ /^MAIN$/i", &[("B", "main")]));
        assert!(ev("$B !~ /^rel/", &[("B", "main")]));
        assert!(!ev("$U =~ /.*/", &[]));
        assert!(ev("$B =~ $RE", &[("B", "feat-1"), ("RE", "/^feat-/")]));
        assert!(ev("$P =~ /a\\/b/", &[("P", "a/b")]));
        // A variable that does not hold a regex is an error, not a silent `!~` true.
        let e = parse("$B !~ $RE").unwrap();
        let look = |n: &str| match n {
            "B" => Some("main".to_string()),
            "RE" => Some("rel-(".to_string()),
            _ => None,
        };
        assert!(
            e.eval_checked(&look)
                .unwrap_err()
                .contains("not a `/regex/`")
        );
        let look2 = |n: &str| (n == "RE").then(|| "/(/".to_string());
        assert!(e.eval_checked(&look2).is_err());
    }

    #[test]
    fn precedence_and_parentheses() {
        assert!(ev("$A || $B && $C", &[("A", "1")]));
        assert!(!ev("($A || $B) && $C", &[("A", "1")]));
        assert!(ev("($A || $B) && ($C == null)", &[("B", "1")]));
    }

    #[test]
    fn syntax_errors_have_offsets() {
        let e = parse("$A == ").unwrap_err();
        assert_eq!(e.offset, 6);
        let e = parse("$A === 'x'").unwrap_err();
        assert!(e.message.contains("unexpected"), "{e}");
        assert!(parse("$A =~ 'x'").is_err());
        assert!(parse("$A =~ /(/").is_err());
        assert!(parse("($A").is_err());
        assert!(parse(&format!("{}$A{}", "(".repeat(100), ")".repeat(100))).is_err());
    }
}
