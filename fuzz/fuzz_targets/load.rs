//! Fuzz the whole front end: YAML → model → plan, on arbitrary bytes. It must never panic,
//! hang or allocate without bound; every failure must be a diagnostic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let loaded = rave_model::load_str(text);
    for d in &loaded.diagnostics {
        let _ = d.render(&loaded.sources, false);
    }
    if let Some(p) = &loaded.pipeline {
        let _ = rave_plan::plan(p, &rave_plan::Trigger::default(), &rave_plan::PlanOptions::default());
    }
});
