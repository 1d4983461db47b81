//! `parallel: N` and `parallel: matrix:` expansion, with GitLab's instance names.

use indexmap::IndexMap;
use rave_model::{Job, Parallel};

pub struct Instance {
    pub name: String,
    pub variables: IndexMap<String, String>,
    pub node: Option<(u32, u32)>,
}

/// Instances of one job: itself, `name i/N`, or `name: [v1, v2]` per matrix combination.
pub fn expand(job: &Job) -> Vec<Instance> {
    match &job.parallel {
        None => vec![Instance {
            name: job.name.clone(),
            variables: IndexMap::new(),
            node: None,
        }],
        Some(Parallel::Count(n)) => (1..=*n)
            .map(|i| Instance {
                name: format!("{} {i}/{n}", job.name),
                variables: IndexMap::new(),
                node: Some((i, *n)),
            })
            .collect(),
        Some(Parallel::Matrix(rows)) => {
            let mut combos: Vec<IndexMap<String, String>> = Vec::new();
            for row in rows {
                let mut acc: Vec<IndexMap<String, String>> = vec![IndexMap::new()];
                for (k, values) in row {
                    let mut next = Vec::with_capacity(acc.len() * values.len().max(1));
                    for partial in &acc {
                        for v in values {
                            let mut p = partial.clone();
                            p.insert(k.clone(), v.clone());
                            next.push(p);
                        }
                    }
                    acc = next;
                }
                combos.extend(acc);
            }
            let total = combos.len() as u32;
            combos
                .into_iter()
                .enumerate()
                .map(|(i, vars)| {
                    let values: Vec<&str> = vars.values().map(String::as_str).collect();
                    Instance {
                        name: format!("{}: [{}]", job.name, values.join(", ")),
                        variables: vars,
                        node: Some((i as u32 + 1, total)),
                    }
                })
                .collect()
        }
    }
}

/// Does an instance's matrix match a `needs: parallel: matrix` selection row? Each key must
/// be one of the row's values for that key.
pub fn selects(
    instance: &IndexMap<String, String>,
    selection: &IndexMap<String, Vec<String>>,
) -> bool {
    selection
        .iter()
        .all(|(k, vs)| instance.get(k).is_some_and(|iv| vs.contains(iv)))
}

/// Replace `$[[ matrix.NAME ]]` with the needing instance's own matrix value, GitLab's way of
/// writing one-to-one dependencies between two matrix jobs. Unknown names are left as written.
pub fn substitute(s: &str, own: &IndexMap<String, String>) -> String {
    let mut out = String::new();
    let mut rest = s;
    while let Some(start) = rest.find("$[[") {
        let Some(len) = rest[start..].find("]]") else {
            break;
        };
        out.push_str(&rest[..start]);
        let inner = rest[start + 3..start + len].trim();
        match inner
            .strip_prefix("matrix.")
            .and_then(|n| own.get(n.trim()))
        {
            Some(v) => out.push_str(v),
            None => out.push_str(&rest[start..start + len + 2]),
        }
        rest = &rest[start + len + 2..];
    }
    out.push_str(rest);
    out
}
