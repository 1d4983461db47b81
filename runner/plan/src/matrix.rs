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

/// Does an instance's matrix match a `needs: parallel: matrix` selection row?
pub fn selects(instance: &IndexMap<String, String>, selection: &IndexMap<String, String>) -> bool {
    selection
        .iter()
        .all(|(k, v)| instance.get(k).is_some_and(|iv| iv == v))
}
