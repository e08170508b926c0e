//! Template specs (`viv_template`): the Dockerfile subset clients upload with `viv template
//! build`, parsed and then planned (variables expanded, directories resolved) on the server.
//!
//! Checks, besides never panicking, hanging or allocating without bound:
//! - parse → print → parse: a spec made of `FROM` and the steps' texts parses to the same
//!   instructions (unless a line ends in `\`, which a printed line would continue);
//! - the plan has a step per instruction; every working directory and `COPY` destination it
//!   yields is absolute and normalized (no `.`/`..`/empty segments), and `PATH` is always set;
//! - `expand` leaves text without `$` or `\` unchanged.
#![no_main]

use libfuzzer_sys::fuzz_target;
use viv_template::{expand, parse, ImageConfig, Instruction};

fn normalized(path: &str) -> bool {
    path.starts_with('/')
        && (path == "/"
            || path
                .trim_end_matches('/')
                .split('/')
                .skip(1)
                .all(|p| !p.is_empty() && p != "." && p != ".."))
}

fuzz_target!(|data: &[u8]| {
    // The spec is the input as text; the base configuration a plausible one.
    let text = String::from_utf8_lossy(data);
    let plain: String = text.chars().filter(|c| *c != '$' && *c != '\\').collect();
    assert_eq!(expand(&plain, &Default::default()).as_deref(), Ok(plain.as_str()));

    let Ok(spec) = parse(&text) else { return };
    // A text that ends in `\` (a continuation into the end of the file) would continue into the
    // next line when printed as a line of its own: such specs are not printed.
    if spec.from.ends_with('\\') || spec.steps.iter().any(|s| s.text.ends_with('\\')) {
        return plan(&spec);
    }
    let mut printed = format!("FROM {}\n", spec.from);
    for step in &spec.steps {
        printed.push_str(&format!("{}\n", step.text));
    }
    let again = parse(&printed).unwrap_or_else(|e| panic!("{printed:?} does not parse again: {e}"));
    assert_eq!(again.from, spec.from);
    let instructions = |s: &viv_template::Spec| s.steps.iter().map(|s| s.instruction.clone()).collect::<Vec<_>>();
    assert_eq!(instructions(&again), instructions(&spec), "{printed:?}");

    plan(&spec);
});

fn plan(spec: &viv_template::Spec) {
    let base = ImageConfig {
        env: [("HOME", "/root"), ("LANG", "C.UTF-8"), ("EMPTY", "")]
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect(),
        workdir: Some("/srv/app".into()),
        user: Some("user".into()),
    };
    let Ok(plan) = spec.plan(&base) else { return };
    assert_eq!(plan.len(), spec.steps.len());
    for step in &plan {
        assert!(step.config.env.contains_key("PATH"));
        if let Some(dir) = &step.config.workdir {
            assert!(normalized(dir), "workdir {dir:?}");
        }
        match &step.instruction {
            Instruction::Workdir(dir) => assert!(normalized(dir), "WORKDIR {dir:?}"),
            Instruction::Copy { dest, .. } => assert!(normalized(dest), "COPY destination {dest:?}"),
            _ => {}
        }
    }
}
