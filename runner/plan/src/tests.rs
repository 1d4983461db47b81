use super::*;

fn load(yaml: &str) -> Pipeline {
    let l = rave_model::load_str(yaml);
    let errs: Vec<String> = l
        .diagnostics
        .iter()
        .filter(|d| d.is_error())
        .map(|d| d.message.clone())
        .collect();
    assert!(errs.is_empty(), "{errs:?}");
    l.pipeline.expect("pipeline")
}

fn plan_with(yaml: &str, t: &Trigger) -> (Option<Plan>, Vec<Diagnostic>) {
    plan(&load(yaml), t, &PlanOptions::default())
}

fn ok(yaml: &str) -> Plan {
    let (p, d) = plan_with(yaml, &Trigger::default());
    let errs: Vec<&str> = d
        .iter()
        .filter(|d| d.is_error())
        .map(|d| d.message.as_str())
        .collect();
    assert!(errs.is_empty(), "{errs:?}");
    p.expect("plan")
}

fn err(yaml: &str) -> String {
    let (p, d) = plan_with(yaml, &Trigger::default());
    assert!(p.is_none());
    d.iter()
        .filter(|d| d.is_error())
        .map(|d| d.message.clone())
        .collect::<Vec<_>>()
        .join("\n")
}

fn deps(p: &Plan, name: &str) -> Vec<String> {
    let mut v: Vec<String> = p
        .by_name(name)
        .expect(name)
        .deps
        .iter()
        .map(|&d| p.jobs[d].name.clone())
        .collect();
    v.sort();
    v
}

#[test]
fn stage_order_makes_later_stages_wait() {
    let p = ok(
        "stages: [a, b, c]\nx: {stage: a, script: x}\ny: {stage: a, script: y}\nz: {stage: b, script: z}\nw: {stage: c, script: w}\n",
    );
    assert_eq!(deps(&p, "z"), ["x", "y"]);
    // w waits for z, which already waits for x and y.
    assert_eq!(deps(&p, "w"), ["z"]);
    assert_eq!(p.by_name("x").unwrap().priority, 3);
    assert_eq!(p.by_name("w").unwrap().priority, 1);
    // Artifacts come from every earlier stage by default.
    assert_eq!(p.by_name("w").unwrap().artifacts_from.len(), 3);
}

#[test]
fn needs_override_stage_order() {
    let p = ok(
        "stages: [a, b]\nx: {stage: a, script: x}\ny: {stage: a, script: y}\nz: {stage: b, script: z, needs: [x]}\nq: {stage: b, script: q, needs: []}\n",
    );
    assert_eq!(deps(&p, "z"), ["x"]);
    assert!(deps(&p, "q").is_empty());
}

#[test]
fn needs_without_artifacts() {
    let p = ok(
        "stages: [a, b]\nx: {stage: a, script: x}\nz: {stage: b, script: z, needs: [{job: x, artifacts: false}]}\n",
    );
    assert_eq!(deps(&p, "z"), ["x"]);
    assert!(p.by_name("z").unwrap().artifacts_from.is_empty());
}

#[test]
fn dependencies_limit_artifacts() {
    let p = ok(
        "stages: [a, b]\nx: {stage: a, script: x}\ny: {stage: a, script: y}\nz: {stage: b, script: z, dependencies: [y]}\n",
    );
    let z = p.by_name("z").unwrap();
    assert_eq!(z.artifacts_from, vec![p.by_name("y").unwrap().id]);
}

#[test]
fn cycle_is_named_in_order() {
    let e =
        err("a: {script: x, needs: [b]}\nb: {script: x, needs: [c]}\nc: {script: x, needs: [a]}\n");
    assert!(
        e.contains("a → b → c → a") || e.contains("b → c → a → b") || e.contains("c → a → b → c"),
        "{e}"
    );
}

#[test]
fn unknown_need_suggests() {
    let l = rave_model::load_str(
        "build: {stage: build, script: x}\ntest: {script: x, needs: [biuld]}\n",
    );
    let (_, d) = plan(
        l.pipeline.as_ref().unwrap(),
        &Trigger::default(),
        &PlanOptions::default(),
    );
    assert!(
        d[0].message.contains("`biuld`, which is not defined"),
        "{:?}",
        d
    );
    assert_eq!(d[0].help.as_deref(), Some("did you mean `build`?"));
}

#[test]
fn need_on_job_excluded_by_rules() {
    let y = "build: {stage: build, script: x, rules: [{if: '$CI_COMMIT_TAG'}]}\ntest: {script: x, needs: [build]}\n";
    let e = err(y);
    assert!(e.contains("leave it out of this pipeline"), "{e}");
    let ok_yaml = y.replace("needs: [build]", "needs: [{job: build, optional: true}]");
    let p = ok(&ok_yaml);
    assert!(p.by_name("build").is_none());
    assert!(deps(&p, "test").is_empty());
}

#[test]
fn need_on_later_stage_is_an_error() {
    let e = err("stages: [a, b]\nx: {stage: a, script: x, needs: [y]}\ny: {stage: b, script: y}\n");
    assert!(e.contains("later stage"), "{e}");
}

#[test]
fn rules_choose_when_and_variables() {
    let y = "job:\n  script: x\n  variables: {A: job}\n  rules:\n    - if: $CI_COMMIT_TAG\n      when: manual\n      variables: {A: tag}\n    - if: $CI_COMMIT_BRANCH == \"main\"\n      when: on_success\n    - when: never\n";
    let p = ok(y);
    let j = p.by_name("job").unwrap();
    assert_eq!(j.when, When::OnSuccess);
    assert_eq!(j.variables["A"], "job");
    let tag = Trigger {
        ref_name: "v1".into(),
        tag: Some("v1".into()),
        ..Trigger::default()
    };
    let (p, _) = plan_with(y, &tag);
    let j = p.as_ref().unwrap().by_name("job").unwrap().clone();
    assert_eq!(j.when, When::Manual);
    assert_eq!(j.variables["A"], "tag");
    // Manual via rules blocks (allow_failure false), as in GitLab.
    assert_eq!(j.allow_failure, AllowFailure::No);
    let other = Trigger {
        ref_name: "feature".into(),
        ..Trigger::default()
    };
    let (p, _) = plan_with(y, &other);
    assert!(p.unwrap().jobs.is_empty());
}

#[test]
fn manual_job_defaults_to_allow_failure() {
    let p = ok("deploy: {script: x, when: manual}\n");
    assert_eq!(p.jobs[0].allow_failure, AllowFailure::Yes);
}

#[test]
fn workflow_rules_can_skip_the_pipeline() {
    let y = "workflow:\n  rules:\n    - if: $CI_COMMIT_TAG\n      variables: {KIND: release}\n    - if: $CI_COMMIT_BRANCH == 'main'\n    - when: never\njob: {script: echo $KIND}\n";
    let p = ok(y);
    assert!(!p.skipped_by_workflow);
    let (p, _) = plan_with(
        y,
        &Trigger {
            ref_name: "dev".into(),
            ..Trigger::default()
        },
    );
    assert!(p.unwrap().skipped_by_workflow);
    let (p, _) = plan_with(
        y,
        &Trigger {
            ref_name: "v2".into(),
            tag: Some("v2".into()),
            ..Trigger::default()
        },
    );
    assert_eq!(p.unwrap().jobs[0].variables["KIND"], "release");
}

#[test]
fn changes_and_exists_use_the_repository() {
    let y = "docs: {script: x, rules: [{changes: ['docs/**/*']}]}\nnode: {script: x, rules: [{exists: [package.json]}]}\n";
    let t = Trigger {
        files: vec!["package.json".into(), "src/main.rs".into()],
        changed_files: Some(vec!["src/main.rs".into()]),
        ..Trigger::default()
    };
    let (p, _) = plan_with(y, &t);
    let p = p.unwrap();
    assert!(p.by_name("docs").is_none());
    assert!(p.by_name("node").is_some());
    let t2 = Trigger {
        changed_files: Some(vec!["docs/guide/a.md".into()]),
        ..t
    };
    let (p, _) = plan_with(y, &t2);
    assert!(p.unwrap().by_name("docs").is_some());
}

#[test]
fn matrix_expands_with_gitlab_names_and_needs_select_instances() {
    let y = "build:\n  stage: build\n  script: x\n  parallel:\n    matrix:\n      - OS: [linux, mac]\n        ARCH: [amd64, arm64]\n      - OS: win\n        ARCH: amd64\ntest:\n  script: x\n  needs:\n    - job: build\n      parallel:\n        matrix:\n          - OS: linux\n            ARCH: arm64\n";
    let p = ok(y);
    let names: Vec<&str> = p.jobs.iter().map(|j| j.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "build: [linux, amd64]",
            "build: [linux, arm64]",
            "build: [mac, amd64]",
            "build: [mac, arm64]",
            "build: [win, amd64]",
            "test"
        ]
    );
    assert_eq!(deps(&p, "test"), ["build: [linux, arm64]"]);
    let b = p.by_name("build: [mac, arm64]").unwrap();
    assert_eq!(b.variables["OS"], "mac");
    assert_eq!(b.variables["CI_NODE_TOTAL"], "5");
}

#[test]
fn parallel_count_names() {
    let p = ok("t: {script: x, parallel: 3}\n");
    let names: Vec<&str> = p.jobs.iter().map(|j| j.name.as_str()).collect();
    assert_eq!(names, ["t 1/3", "t 2/3", "t 3/3"]);
}

#[test]
fn variable_precedence_and_expansion() {
    let y = "variables: {A: global, B: \"$A-b\", C: {value: \"$A\", expand: false}}\njob:\n  script: x\n  variables: {A: job}\n";
    let mut t = Trigger::default();
    let p = plan_with(y, &t).0.unwrap();
    let j = &p.jobs[0];
    assert_eq!(j.variables["A"], "job");
    assert_eq!(j.variables["B"], "job-b");
    assert_eq!(j.variables["C"], "$A");
    t.variables.insert("A".into(), "cli".into());
    let p = plan_with(y, &t).0.unwrap();
    assert_eq!(p.jobs[0].variables["B"], "cli-b");
}

#[test]
fn self_reference_does_not_loop() {
    let p =
        ok("variables: {A: \"x$A\", B: $C, C: $B, D: \"$CI_PROJECT_DIR/t\"}\njob: {script: x}\n");
    // Left for the job's start, where `$A` means the value from the environment (`PATH: …:$PATH`)
    // and runtime variables like CI_PROJECT_DIR exist.
    assert_eq!(p.jobs[0].variables["A"], "x$A");
    assert_eq!(p.jobs[0].variables["D"], "$CI_PROJECT_DIR/t");
}

#[test]
fn resources_from_variables_resources_and_defaults() {
    let y = ".rave:\n  defaults: {memory: 256M, cpus: 0.5}\na: {script: x}\nb: {script: x, variables: {RAVE_MEMORY: 1G, RAVE_CPUS: 2}}\nc: {script: x, resources: {memory: 768M}}\n";
    let p = ok(y);
    assert_eq!(p.by_name("a").unwrap().memory_bytes, 256 << 20);
    assert_eq!(p.by_name("a").unwrap().cpus, 0.5);
    assert_eq!(p.by_name("b").unwrap().memory_bytes, 1 << 30);
    assert_eq!(p.by_name("b").unwrap().cpus, 2.0);
    assert_eq!(p.by_name("c").unwrap().memory_bytes, 768 << 20);
}

/// A multi-project trigger runs nothing on this machine: it asks the server for the other
/// project's pipeline and waits, so it requests nothing (it used to request the whole budget
/// and so waited until every other job had ended before it could even ask). A child-pipeline
/// trigger still gets the whole budget: its jobs run inside that share.
#[test]
fn a_multi_project_trigger_requests_nothing_and_a_child_trigger_the_budget() {
    let p = ok(
        "build: {stage: build, script: x}\nother: {stage: deploy, trigger: {project: g/other}}\nchild: {stage: deploy, trigger: {include: child.yml}}\n",
    );
    let other = p.by_name("other").unwrap();
    assert_eq!((other.memory_bytes, other.cpus), (0, 0.0));
    let child = p.by_name("child").unwrap();
    assert_eq!(
        child.memory_bytes,
        PlanOptions::default().budget.memory_bytes
    );
}

#[test]
fn request_over_budget_is_an_error() {
    let e = err("big: {script: x, variables: {RAVE_MEMORY: 4G}}\n");
    assert!(e.contains("more than the whole budget of 3 GiB"), "{e}");
    let e = err("big: {script: x, variables: {RAVE_CPUS: 3}}\n");
    assert!(e.contains("3 CPUs"), "{e}");
}

#[test]
fn only_except_refs() {
    let y = "a: {script: x, only: [tags]}\nb: {script: x, except: [main]}\nc: {script: x, only: ['/^rel-/']}\n";
    let p = ok(y);
    assert!(p.by_name("a").is_none());
    assert!(p.by_name("b").is_none());
    assert!(p.by_name("c").is_none());
    let (p, _) = plan_with(
        y,
        &Trigger {
            ref_name: "rel-1".into(),
            ..Trigger::default()
        },
    );
    let p = p.unwrap();
    assert!(p.by_name("b").is_some() && p.by_name("c").is_some());
}

mod props {
    use super::*;
    use proptest::prelude::*;

    /// A random pipeline: `n` jobs over 3 stages, each with either stage ordering or `needs`
    /// pointing only at lower-numbered jobs in the same or earlier stages (so it is acyclic).
    fn acyclic() -> impl Strategy<Value = String> {
        (2usize..25).prop_flat_map(|n| {
            let stages = proptest::collection::vec(0usize..3, n);
            let needs = proptest::collection::vec(
                proptest::option::of(proptest::collection::vec(
                    any::<prop::sample::Index>(),
                    0..4,
                )),
                n,
            );
            (stages, needs).prop_map(move |(mut stages, needs)| {
                stages.sort();
                let mut y = String::from("stages: [s0, s1, s2]\n");
                for i in 0..n {
                    y.push_str(&format!("j{i}:\n  stage: s{}\n  script: x\n", stages[i]));
                    if let Some(idx) = &needs[i] {
                        let picks: std::collections::BTreeSet<usize> = if i == 0 {
                            Default::default()
                        } else {
                            idx.iter().map(|x| x.index(i)).collect()
                        };
                        let list: Vec<String> = picks.iter().map(|p| format!("j{p}")).collect();
                        y.push_str(&format!("  needs: [{}]\n", list.join(", ")));
                    }
                }
                y
            })
        })
    }

    /// Is `b` reachable from `a` following deps?
    fn waits_for(p: &Plan, a: usize, b: usize) -> bool {
        let mut stack = vec![a];
        let mut seen = vec![false; p.jobs.len()];
        while let Some(x) = stack.pop() {
            for &d in &p.jobs[x].deps {
                if d == b {
                    return true;
                }
                if !seen[d] {
                    seen[d] = true;
                    stack.push(d);
                }
            }
        }
        false
    }

    proptest! {
        #[test]
        fn plan_respects_every_edge_and_stage(y in acyclic()) {
            let pipeline = load(&y);
            let (p, d) = plan(&pipeline, &Trigger::default(), &PlanOptions::default());
            prop_assert!(d.iter().all(|d| !d.is_error()), "{:?}", d);
            let p = p.unwrap();
            for j in &p.jobs {
                match &j.job.needs {
                    Some(needs) => for n in needs {
                        let t = p.by_name(&n.job).unwrap();
                        prop_assert!(j.deps.contains(&t.id));
                        prop_assert!(t.priority > j.priority);
                    },
                    None => for other in p.jobs.iter().filter(|o| o.stage_index < j.stage_index) {
                        prop_assert!(waits_for(&p, j.id, other.id), "{} must wait for {}", j.name, other.name);
                        prop_assert!(other.priority > j.priority || !waits_for(&p, j.id, other.id));
                    },
                }
                for &d in &j.deps {
                    prop_assert!(p.jobs[d].priority > j.priority);
                    prop_assert!(p.jobs[d].stage_index <= j.stage_index);
                }
            }
        }

        #[test]
        fn every_cycle_is_found(n in 2usize..12, extra in proptest::collection::vec((0usize..12, 0usize..12), 0..6)) {
            // A ring j0 → j1 → … → j0 in one stage, plus random extra needs: always cyclic.
            let mut needs: Vec<Vec<usize>> = (0..n).map(|i| vec![(i + 1) % n]).collect();
            for (a, b) in extra {
                if a < n && b < n && a != b && !needs[a].contains(&b) {
                    needs[a].push(b);
                }
            }
            let mut y = String::new();
            for (i, ns) in needs.iter().enumerate() {
                let list: Vec<String> = ns.iter().map(|x| format!("j{x}")).collect();
                y.push_str(&format!("j{i}: {{script: x, needs: [{}]}}\n", list.join(", ")));
            }
            let (p, d) = plan(&load(&y), &Trigger::default(), &PlanOptions::default());
            prop_assert!(p.is_none());
            let msg = d.iter().find(|d| d.message.contains("cycle")).map(|d| d.message.clone());
            prop_assert!(msg.is_some(), "{:?}", d);
            // The reported chain is a real cycle: each name needs the next.
            let msg = msg.unwrap();
            let chain: Vec<&str> = msg.split(": ").nth(1).unwrap().split(" → ").collect();
            prop_assert_eq!(chain.first(), chain.last());
            for w in chain.windows(2) {
                let a: usize = w[0][1..].parse().unwrap();
                let b: usize = w[1][1..].parse().unwrap();
                prop_assert!(needs[a].contains(&b), "{} does not need {}", w[0], w[1]);
            }
        }
    }
}

#[test]
fn weighted_priorities_follow_durations() {
    let mut p =
        ok("a: {script: x, needs: []}\nb: {script: x, needs: [a]}\nc: {script: x, needs: []}\n");
    assert!(p.by_name("a").unwrap().priority > p.by_name("c").unwrap().priority);
    let secs = |j: &JobInstance| match j.name.as_str() {
        "c" => 10_000,
        _ => 100,
    };
    dag::weighted_priorities(&mut p.jobs, &secs).unwrap();
    assert_eq!(p.by_name("a").unwrap().priority, 200);
    assert_eq!(p.by_name("c").unwrap().priority, 10_000);
}
