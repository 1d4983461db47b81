//! CI/CD inputs from a file's `spec:` header: `$[[ inputs.NAME ]]` is replaced by the input's
//! value before anything else reads the file, as GitLab does.
//!
//! rave does not pass inputs to a file yet, so every input takes its `default:`; an input
//! without one is an error at the place it is used. When a whole scalar is one interpolation
//! the default keeps its type (a boolean stays a boolean), as in GitLab.

use crate::diag::{Diagnostic, did_you_mean};
use crate::yaml::{Node, Value};

const INPUT_KEYS: &[&str] = &[
    "default",
    "description",
    "options",
    "regex",
    "type",
    "rules",
];

struct Input {
    name: String,
    default: Option<Node>,
}

fn read_spec(header: &Node, diags: &mut Vec<Diagnostic>) -> Vec<Input> {
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
    let mut out = Vec::new();
    for (k, v) in m {
        if let Some(vm) = v.as_map() {
            for (vk, _) in vm {
                if !INPUT_KEYS.contains(&vk.name.as_str()) {
                    diags.push(
                        Diagnostic::error(
                            format!("unknown key `{}` in input `{}`", vk.name, k.name),
                            Some(vk.span),
                        )
                        .with_help_opt(did_you_mean(&vk.name, INPUT_KEYS.iter().copied())),
                    );
                }
            }
        }
        out.push(Input {
            name: k.name.clone(),
            default: v.get("default").cloned(),
        });
    }
    out
}

/// Replace `$[[ inputs.NAME ]]` in `node` with the defaults declared in `header`.
pub fn interpolate_defaults(header: &Node, node: &mut Node, diags: &mut Vec<Diagnostic>) {
    let inputs = read_spec(header, diags);
    walk(node, &inputs, diags);
}

fn walk(node: &mut Node, inputs: &[Input], diags: &mut Vec<Diagnostic>) {
    match &mut node.value {
        Value::Str(s) if s.contains("$[[") => {
            let text = s.clone();
            if let Some(v) = interpolate(&text, node, inputs, diags) {
                node.value = v;
            }
        }
        Value::Seq(items) => items.iter_mut().for_each(|i| walk(i, inputs, diags)),
        Value::Map(m) => m.iter_mut().for_each(|(_, v)| walk(v, inputs, diags)),
        _ => {}
    }
}

fn interpolate(
    text: &str,
    at: &Node,
    inputs: &[Input],
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
        let Some(name) = inner.strip_prefix("inputs.") else {
            // `$[[ matrix.NAME ]]` and other contexts are resolved elsewhere.
            out.push_str(&rest[start..start + len + 2]);
            rest = &rest[start + len + 2..];
            continue;
        };
        if name.contains('|') {
            diags.push(
                Diagnostic::error(
                    format!("input functions (`{inner}`) are not supported yet"),
                    Some(at.span),
                )
                .with_help("use the input without a function"),
            );
            return None;
        }
        let name = name.trim();
        let Some(input) = inputs.iter().find(|i| i.name == name) else {
            diags.push(
                Diagnostic::error(format!("unknown input `{name}`"), Some(at.span))
                    .with_help_opt(did_you_mean(name, inputs.iter().map(|i| i.name.as_str())))
                    .with_label("not in `spec: inputs`"),
            );
            return None;
        };
        let Some(default) = &input.default else {
            diags.push(
                Diagnostic::error(
                    format!(
                        "input `{name}` is required: it has no `default:`, and no value was given"
                    ),
                    Some(at.span),
                )
                .with_help("give the input a `default:` in the file's `spec:` header"),
            );
            return None;
        };
        if start == 0 && len + 2 == rest.len() && out.is_empty() {
            whole = Some(default.value.clone());
        }
        match default.scalar_string() {
            Some(v) => out.push_str(&v),
            None if whole.is_some() => {}
            None => {
                diags.push(Diagnostic::error(
                    format!(
                        "input `{name}` is {}, which cannot be placed inside a string",
                        default.type_name()
                    ),
                    Some(at.span),
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::FileId;
    use crate::yaml::{Limits, parse_file};

    #[test]
    fn defaults_replace_inputs_and_keep_their_type_when_whole() {
        let p = parse_file(
            "spec:\n  inputs:\n    stage: {default: test}\n    flag: {default: true, type: boolean}\n---\njob:\n  stage: $[[ inputs.stage ]]\n  script: echo in-$[[inputs.stage]]-x\n  interruptible: $[[ inputs.flag ]]\n",
            FileId(0),
            Limits::default(),
        )
        .unwrap();
        let mut root = p.root;
        let mut d = Vec::new();
        interpolate_defaults(&p.header.unwrap(), &mut root, &mut d);
        assert!(d.is_empty(), "{d:?}");
        let job = root.get("job").unwrap();
        assert_eq!(job.get("stage").unwrap().as_str(), Some("test"));
        assert_eq!(job.get("script").unwrap().as_str(), Some("echo in-test-x"));
        assert_eq!(job.get("interruptible").unwrap().value, Value::Bool(true));
    }

    #[test]
    fn missing_and_unknown_inputs_are_errors() {
        let p = parse_file(
            "spec:\n  inputs:\n    need_me:\n---\njob:\n  script:\n    - $[[ inputs.need_me ]]\n    - $[[ inputs.neeed_me2 ]]\n",
            FileId(0),
            Limits::default(),
        )
        .unwrap();
        let mut root = p.root;
        let mut d = Vec::new();
        interpolate_defaults(&p.header.unwrap(), &mut root, &mut d);
        assert_eq!(d.len(), 2, "{d:?}");
        assert!(d[0].message.contains("`need_me` is required"));
        assert!(d[1].message.contains("unknown input `neeed_me2`"));
    }
}
