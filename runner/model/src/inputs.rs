//! CI/CD inputs from a file's `spec:` header: `$[[ inputs.NAME ]]` is replaced by the input's
//! value before anything else reads the file, as GitLab does.
//!
//! Values come from `include: inputs:` (for included files), from `rave run --input` (for the
//! main file), or from the input's `default:`. Each is checked against the input's `type`
//! (string, number, boolean, array), `options` and `regex`. When a whole scalar is one
//! interpolation, the value keeps its type (a boolean stays a boolean); inside a string it is
//! written out. GitLab's functions apply in a chain: `$[[ inputs.x | expand_vars |
//! truncate(0, 8) | posix_escape ]]`.

use indexmap::IndexMap;

use crate::diag::{Diagnostic, did_you_mean};
use crate::source::Span;
use crate::yaml::{Node, Value};

const INPUT_KEYS: &[&str] = &[
    "default",
    "description",
    "options",
    "regex",
    "type",
    "rules",
];
const TYPES: &[&str] = &["string", "number", "boolean", "array"];

struct Input {
    name: String,
    /// The value to use: given, else the default; None when neither.
    value: Option<Node>,
}

fn spec_inputs(header: &Node, diags: &mut Vec<Diagnostic>) -> Vec<(String, Span, Node)> {
    let Some(spec) = header.get("spec") else {
        return Vec::new();
    };
    let Some(inputs) = spec.get("inputs") else {
        return Vec::new();
    };
    let Some(m) = inputs.as_map() else {
        if !inputs.is_null() {
            diags.push(Diagnostic::error(
                format!(
                    "`spec: inputs` must be a mapping, not {}",
                    inputs.type_name()
                ),
                Some(inputs.span),
            ));
        }
        return Vec::new();
    };
    m.iter()
        .map(|(k, v)| (k.name.clone(), k.span, v.clone()))
        .collect()
}

/// A value given on the command line as text, read as the input's type.
pub fn from_text(text: &str, span: Span) -> Node {
    Node::new(Value::Str(text.to_string()), span)
}

fn coerce(name: &str, ty: &str, v: &Node, diags: &mut Vec<Diagnostic>) -> Option<Node> {
    let bad = |diags: &mut Vec<Diagnostic>| {
        diags.push(
            Diagnostic::error(
                format!("input `{name}` must be {ty}, not {}", v.type_name()),
                Some(v.span),
            )
            .with_label("wrong type"),
        );
        None
    };
    match (ty, &v.value) {
        ("string", Value::Str(_) | Value::Int(_) | Value::Float(_) | Value::Bool(_)) => {
            Some(Node::new(Value::Str(v.scalar_string()?), v.span))
        }
        ("number", Value::Int(_) | Value::Float(_)) => Some(v.clone()),
        ("number", Value::Str(s)) => match (s.parse::<i64>(), s.parse::<f64>()) {
            (Ok(i), _) => Some(Node::new(Value::Int(i), v.span)),
            (_, Ok(f)) if f.is_finite() => Some(Node::new(Value::Float(f), v.span)),
            _ => bad(diags),
        },
        ("boolean", Value::Bool(_)) => Some(v.clone()),
        ("boolean", Value::Str(s)) if s == "true" || s == "false" => {
            Some(Node::new(Value::Bool(s == "true"), v.span))
        }
        ("array", Value::Seq(_)) => Some(v.clone()),
        ("array", Value::Str(s)) => {
            match crate::yaml::parse(s, v.span.file, crate::yaml::Limits::default()) {
                Ok(n) if matches!(n.value, Value::Seq(_)) => Some(Node::new(n.value, v.span)),
                _ => bad(diags),
            }
        }
        _ => bad(diags),
    }
}

/// Check the inputs a file declares against what it is given; returns name → value.
fn resolve(header: &Node, given: &[(String, Node)], diags: &mut Vec<Diagnostic>) -> Vec<Input> {
    let declared = spec_inputs(header, diags);
    for (name, v) in given {
        if !declared.iter().any(|(n, _, _)| n == name) {
            diags.push(
                Diagnostic::error(format!("unknown input `{name}`"), Some(v.span))
                    .with_label("not in the file's `spec: inputs`")
                    .with_help_opt(did_you_mean(
                        name,
                        declared.iter().map(|(n, _, _)| n.as_str()),
                    )),
            );
        }
    }
    let mut out = Vec::new();
    for (name, span, decl) in declared {
        if let Some(m) = decl.as_map() {
            for (k, _) in m {
                if !INPUT_KEYS.contains(&k.name.as_str()) {
                    diags.push(
                        Diagnostic::error(
                            format!("unknown key `{}` in input `{name}`", k.name),
                            Some(k.span),
                        )
                        .with_help_opt(did_you_mean(&k.name, INPUT_KEYS.iter().copied())),
                    );
                }
            }
        }
        let ty = decl
            .get("type")
            .and_then(Node::as_str)
            .unwrap_or("string")
            .to_string();
        if !TYPES.contains(&ty.as_str()) {
            diags.push(
                Diagnostic::error(
                    format!("input `{name}` has unknown type `{ty}`"),
                    decl.get("type").map(|t| t.span),
                )
                .with_help("types are string, number, boolean and array"),
            );
            out.push(Input { name, value: None });
            continue;
        }
        let raw = given
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v.clone())
            .or_else(|| decl.get("default").cloned());
        let value = match raw {
            None => {
                diags.push(
                    Diagnostic::error(
                        format!("input `{name}` is required: it has no `default:`, and no value was given"),
                        Some(span),
                    )
                    .with_help("pass it (`include: inputs:`, or `rave run --input NAME=VALUE` for the main file), or give it a `default:`"),
                );
                None
            }
            Some(v) => coerce(&name, &ty, &v, diags),
        };
        if let Some(v) = &value {
            if let Some(options) = decl.get("options").and_then(Node::as_seq) {
                let allowed: Vec<String> = options.iter().filter_map(Node::scalar_string).collect();
                let got = v.scalar_string().unwrap_or_default();
                if !allowed.contains(&got) {
                    diags.push(Diagnostic::error(
                        format!(
                            "input `{name}`: `{got}` is not one of its options: {}",
                            allowed.join(", ")
                        ),
                        Some(v.span),
                    ));
                }
            }
            if let Some(re) = decl.get("regex").and_then(Node::as_str) {
                let pattern = re.trim_start_matches('/').trim_end_matches('/');
                match regex::Regex::new(pattern) {
                    Ok(r) => {
                        let got = v.scalar_string().unwrap_or_default();
                        if !r.is_match(&got) {
                            diags.push(Diagnostic::error(
                                format!("input `{name}`: `{got}` does not match its regex {re}"),
                                Some(v.span),
                            ));
                        }
                    }
                    Err(e) => diags.push(Diagnostic::error(
                        format!("input `{name}` has an invalid regex: {e}"),
                        decl.get("regex").map(|r| r.span),
                    )),
                }
            }
        }
        out.push(Input { name, value });
    }
    out
}

/// Replace `$[[ inputs.NAME ]]` in `node` (values and mapping keys) with the inputs' values.
/// `vars` are what `expand_vars` expands.
pub fn interpolate(
    header: &Node,
    given: &[(String, Node)],
    vars: &IndexMap<String, String>,
    node: &mut Node,
    diags: &mut Vec<Diagnostic>,
) {
    let inputs = resolve(header, given, diags);
    walk(node, &inputs, vars, diags);
}

fn walk(
    node: &mut Node,
    inputs: &[Input],
    vars: &IndexMap<String, String>,
    diags: &mut Vec<Diagnostic>,
) {
    match &mut node.value {
        Value::Str(s) if s.contains("$[[") => {
            let text = s.clone();
            if let Some(v) = interpolate_str(&text, node.span, inputs, vars, diags) {
                node.value = v;
            }
        }
        Value::Seq(items) => items.iter_mut().for_each(|i| walk(i, inputs, vars, diags)),
        Value::Map(m) => {
            for (k, v) in m.iter_mut() {
                if k.name.contains("$[[")
                    && let Some(Value::Str(name)) =
                        interpolate_str(&k.name.clone(), k.span, inputs, vars, diags)
                {
                    k.name = name;
                }
                walk(v, inputs, vars, diags);
            }
        }
        _ => {}
    }
}

fn interpolate_str(
    text: &str,
    at: Span,
    inputs: &[Input],
    vars: &IndexMap<String, String>,
    diags: &mut Vec<Diagnostic>,
) -> Option<Value> {
    let mut out = String::new();
    let mut rest = text;
    let mut whole: Option<Value> = None;
    while let Some(start) = rest.find("$[[") {
        let Some(len) = rest[start..].find("]]") else {
            break;
        };
        let inner = rest[start + 3..start + len].trim();
        out.push_str(&rest[..start]);
        let mut parts = inner.split('|').map(str::trim);
        let head = parts.next().unwrap_or_default();
        let Some(name) = head.strip_prefix("inputs.") else {
            // `$[[ matrix.NAME ]]` and other contexts are resolved elsewhere.
            out.push_str(&rest[start..start + len + 2]);
            rest = &rest[start + len + 2..];
            continue;
        };
        let Some(input) = inputs.iter().find(|i| i.name == name) else {
            diags.push(
                Diagnostic::error(format!("unknown input `{name}`"), Some(at))
                    .with_help_opt(did_you_mean(name, inputs.iter().map(|i| i.name.as_str())))
                    .with_label("not in `spec: inputs`"),
            );
            return None;
        };
        // Already reported where the input is declared.
        let value = input.value.as_ref()?;
        let functions: Vec<&str> = parts.collect();
        let mut is_whole = start == 0 && len + 2 == rest.len() && out.is_empty();
        let mut text_value = value.scalar_string();
        if !functions.is_empty() {
            let Some(mut t) = text_value.clone() else {
                diags.push(Diagnostic::error(
                    format!(
                        "input `{name}` is {}, which functions cannot take",
                        value.type_name()
                    ),
                    Some(at),
                ));
                return None;
            };
            for f in &functions {
                t = apply(f, &t, vars).map_err(|e| {
                    diags.push(Diagnostic::error(
                        format!("`$[[ {inner} ]]`: {e}"),
                        Some(at),
                    ).with_help("functions are expand_vars, truncate(start, length) and posix_escape"));
                }).ok()?;
            }
            text_value = Some(t);
            // A function's result is text, never the input's own type.
            is_whole = false;
        }
        if is_whole {
            whole = Some(value.value.clone());
        }
        match text_value {
            Some(v) => out.push_str(&v),
            None if whole.is_some() => {}
            None => {
                diags.push(Diagnostic::error(
                    format!(
                        "input `{name}` is {}, which cannot be placed inside a string",
                        value.type_name()
                    ),
                    Some(at),
                ));
                return None;
            }
        }
        rest = &rest[start + len + 2..];
    }
    if let Some(v) = whole {
        return Some(v);
    }
    out.push_str(rest);
    Some(Value::Str(out))
}

/// GitLab's input functions.
fn apply(f: &str, v: &str, vars: &IndexMap<String, String>) -> Result<String, String> {
    let (name, args) = match f.split_once('(') {
        Some((n, a)) => (n.trim(), Some(a.trim_end_matches(')').trim())),
        None => (f.trim(), None),
    };
    match (name, args) {
        ("expand_vars", None) => Ok(crate::vars::expand_known(v, &|k| vars.get(k).cloned())),
        ("posix_escape", None) => Ok(posix_escape(v)),
        ("truncate", Some(a)) => {
            let nums: Vec<usize> = a
                .split(',')
                .map(|x| x.trim().parse::<usize>())
                .collect::<Result<_, _>>()
                .map_err(|_| format!("truncate takes two numbers, not `{a}`"))?;
            let [start, len] = nums[..] else {
                return Err(format!("truncate takes (start, length), not `{a}`"));
            };
            Ok(v.chars().skip(start).take(len).collect())
        }
        _ => Err(format!("unknown function `{f}`")),
    }
}

/// Ruby's `Shellwords.escape`, which GitLab's `posix_escape` is: every character that is not
/// plainly safe (ASCII letters, digits, `_-.,:+/@`) gets a backslash, multibyte ones too; a
/// newline becomes `'\n'`; the empty string `''`.
fn posix_escape(v: &str) -> String {
    if v.is_empty() {
        return "''".into();
    }
    let mut out = String::with_capacity(v.len() * 2);
    for c in v.chars() {
        if c == '\n' {
            out.push_str("'\n'");
        } else if c.is_ascii_alphanumeric() || "_-.,:+/@".contains(c) {
            out.push(c);
        } else {
            out.push('\\');
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::FileId;
    use crate::yaml::{Limits, parse_file};

    fn run(text: &str, given: &[(&str, Node)]) -> (Node, Vec<Diagnostic>) {
        let p = parse_file(text, FileId(0), Limits::default()).unwrap();
        let mut root = p.root;
        let mut d = Vec::new();
        let given: Vec<(String, Node)> = given
            .iter()
            .map(|(k, v)| (k.to_string(), v.clone()))
            .collect();
        let vars: IndexMap<String, String> = [("CI_PROJECT_NAME".to_string(), "app".to_string())]
            .into_iter()
            .collect();
        interpolate(&p.header.unwrap(), &given, &vars, &mut root, &mut d);
        (root, d)
    }

    fn s(v: &str) -> Node {
        Node::new(Value::Str(v.into()), Span::default())
    }

    #[test]
    fn defaults_replace_inputs_and_keep_their_type_when_whole() {
        let (root, d) = run(
            "spec:\n  inputs:\n    stage: {default: test}\n    flag: {default: true, type: boolean}\n---\njob:\n  stage: $[[ inputs.stage ]]\n  script: echo in-$[[inputs.stage]]-x\n  interruptible: $[[ inputs.flag ]]\n",
            &[],
        );
        assert!(d.is_empty(), "{d:?}");
        let job = root.get("job").unwrap();
        assert_eq!(job.get("stage").unwrap().as_str(), Some("test"));
        assert_eq!(job.get("script").unwrap().as_str(), Some("echo in-test-x"));
        assert_eq!(job.get("interruptible").unwrap().value, Value::Bool(true));
    }

    #[test]
    fn given_values_are_typed_checked_and_used_in_keys() {
        let (root, d) = run(
            "spec:\n  inputs:\n    n: {type: number}\n    env: {options: [dev, prod]}\n    name: {regex: '^[a-z]+$'}\n---\n'deploy-$[[ inputs.name ]]':\n  parallel: $[[ inputs.n ]]\n  script:\n    - echo $[[ inputs.env ]]\n",
            &[("n", s("3")), ("env", s("prod")), ("name", s("eu"))],
        );
        assert!(d.is_empty(), "{d:?}");
        let job = root.get("deploy-eu").unwrap();
        assert_eq!(job.get("parallel").unwrap().value, Value::Int(3));
        let (_, d) = run(
            "spec:\n  inputs:\n    n: {type: number}\n    env: {options: [dev, prod]}\n    name: {regex: '^[a-z]+$'}\n---\nj:\n  script: [x]\n",
            &[
                ("n", s("three")),
                ("env", s("qa")),
                ("name", s("EU1")),
                ("nope", s("x")),
            ],
        );
        let text: Vec<String> = d.iter().map(|x| x.message.clone()).collect();
        assert!(
            text.iter().any(|m| m.contains("`n` must be number")),
            "{text:?}"
        );
        assert!(
            text.iter().any(|m| m.contains("not one of its options")),
            "{text:?}"
        );
        assert!(
            text.iter().any(|m| m.contains("does not match its regex")),
            "{text:?}"
        );
        assert!(
            text.iter().any(|m| m.contains("unknown input `nope`")),
            "{text:?}"
        );
    }

    #[test]
    fn functions_chain() {
        let (root, d) = run(
            "spec:\n  inputs:\n    v: {default: 'hello world $CI_PROJECT_NAME'}\n---\nj:\n  script:\n    - echo $[[ inputs.v | expand_vars | truncate(6, 9) ]]\n    - echo $[[ inputs.v | posix_escape ]]\n",
            &[],
        );
        assert!(d.is_empty(), "{d:?}");
        let script = root
            .get("j")
            .unwrap()
            .get("script")
            .unwrap()
            .as_seq()
            .unwrap();
        assert_eq!(script[0].as_str(), Some("echo world app"));
        assert_eq!(
            script[1].as_str(),
            Some("echo hello\\ world\\ \\$CI_PROJECT_NAME")
        );
        assert_eq!(posix_escape("a b'é\n"), "a\\ b\\'\\é'\n'");
        assert_eq!(posix_escape(""), "''");
    }

    #[test]
    fn missing_and_unknown_inputs_are_errors() {
        let (_, d) = run(
            "spec:\n  inputs:\n    need_me:\n---\njob:\n  script:\n    - $[[ inputs.need_me ]]\n    - $[[ inputs.neeed_me2 ]]\n",
            &[],
        );
        assert!(
            d.iter()
                .any(|x| x.message.contains("`need_me` is required")),
            "{d:?}"
        );
        assert!(
            d.iter()
                .any(|x| x.message.contains("unknown input `neeed_me2`")),
            "{d:?}"
        );
    }
}
