//! Parser and planner tests.

use super::*;

fn env(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
}

#[test]
fn parses_every_supported_instruction() {
    let spec = parse(
        "# syntax comment\n\
         FROM base\n\
         \n\
         ENV APP_HOME=/srv/app GREETING=\"hello world\"\n\
         WORKDIR $APP_HOME\n\
         COPY --chown=user:user app.py requirements.txt ./\n\
         RUN apt-get update && \\\n\
         # a comment inside a continuation\n\
             apt-get install -y jq\n\
         RUN [\"python3\", \"-c\", \"print(1)\"]\n\
         USER user\n\
         EXPOSE 8000\n\
         CMD python3 -m http.server 8000\n\
         HEALTHCHECK --interval=200ms --retries=3 CMD curl -sf localhost:8000\n",
    )
    .unwrap();
    assert_eq!(spec.from, "base");
    assert_eq!(spec.steps.len(), 6);
    assert_eq!(spec.steps[3].line, 7);
    assert_eq!(
        spec.steps[3].instruction,
        Instruction::Run(Command::Shell("apt-get update && apt-get install -y jq".into()))
    );
    assert_eq!(
        spec.steps[4].instruction,
        Instruction::Run(Command::Exec(vec!["python3".into(), "-c".into(), "print(1)".into()]))
    );
    assert_eq!(spec.start, Some(Command::Shell("python3 -m http.server 8000".into())));
    let ready = spec.ready.clone().unwrap();
    assert_eq!(ready.interval, Duration::from_millis(200));
    assert_eq!(ready.command, Command::Shell("curl -sf localhost:8000".into()));
    assert_eq!(
        spec.warnings,
        vec![(12, "EXPOSE has no effect in a Vivarium template; ignored".into())]
    );

    let plan = spec.plan(&ImageConfig::default()).unwrap();
    assert_eq!(plan[0].config.env["GREETING"], "hello world");
    assert_eq!(plan[0].config.env["PATH"], DEFAULT_PATH);
    assert_eq!(plan[1].instruction, Instruction::Workdir("/srv/app".into()));
    assert_eq!(
        plan[2].instruction,
        Instruction::Copy {
            sources: vec!["app.py".into(), "requirements.txt".into()],
            dest: "/srv/app/".into(),
            chown: Some("user:user".into()),
        }
    );
    assert_eq!(plan[5].config.user.as_deref(), Some("user"));
    assert_eq!(plan[5].config.workdir.as_deref(), Some("/srv/app"));
}

#[test]
fn errors_name_the_line() {
    let cases = [
        ("RUN true\n", 1, "must start with FROM"),
        ("FROM base\n\nFRM x\n", 3, "unknown instruction 'FRM'"),
        ("FROM base\nRUN\n", 2, "RUN needs a command"),
        ("FROM base\nCOPY a\n", 2, "at least one source"),
        ("FROM base\nCOPY a b c\n", 2, "ending in '/'"),
        ("FROM base\nCOPY ../secret /x\n", 2, "inside the build context"),
        ("FROM base\nENV A=\"open\n", 2, "unterminated"),
        ("FROM base\nENV 1A=x\n", 2, "not a valid environment variable name"),
        ("FROM base\nFROM other\n", 2, "multi-stage"),
        ("FROM base AS build\n", 1, "AS are not supported"),
        ("FROM base\nRUN [\"ls\", \n", 2, "not a JSON array"),
        (
            "FROM base\nHEALTHCHECK --every=1s CMD true\n",
            2,
            "unknown HEALTHCHECK option",
        ),
        ("FROM base\nADD x.tar /\n", 2, "use COPY"),
        ("# only a comment\n", 1, "empty"),
    ];
    for (text, line, needle) in cases {
        let err = parse(text).expect_err(text);
        assert_eq!(err.line, line, "{text:?}: {err}");
        assert!(err.message.contains(needle), "{text:?}: {err}");
    }
}

#[test]
fn expands_variables() {
    let vars = env(&[("HOME", "/root"), ("EMPTY", "")]);
    assert_eq!(expand("$HOME/bin:${HOME}/x", &vars).unwrap(), "/root/bin:/root/x");
    assert_eq!(expand("${EMPTY:-fallback} ${MISSING:-d}", &vars).unwrap(), "fallback d");
    assert_eq!(expand("\\$HOME costs $5", &vars).unwrap(), "$HOME costs ");
    assert_eq!(expand("a $ b", &vars).unwrap(), "a $ b");
    assert!(expand("${HOME", &vars).is_err());
}

#[test]
fn env_extends_inherited_path() {
    let spec = parse("FROM base\nENV PATH=/opt/bin:$PATH\nWORKDIR app\nWORKDIR ../srv/./x\n").unwrap();
    let plan = spec.plan(&ImageConfig::default()).unwrap();
    assert_eq!(plan[0].config.env["PATH"], format!("/opt/bin:{DEFAULT_PATH}"));
    assert_eq!(plan[2].config.workdir.as_deref(), Some("/srv/x"));
}

#[test]
fn legacy_env_form_and_quotes() {
    let spec = parse("FROM base\nENV NAME some value\nENV A='$literal' B=\\$x\n").unwrap();
    let plan = spec.plan(&ImageConfig::default()).unwrap();
    assert_eq!(plan[1].config.env["NAME"], "some value");
    assert_eq!(plan[1].config.env["B"], "$x");
}

/// Found by the `template` fuzz target: minutes past `u64::MAX / 60` seconds overflowed (a panic
/// in debug builds, a wrong interval in release builds).
#[test]
fn a_huge_healthcheck_interval_is_an_error() {
    let err = parse("FROM base\nHEALTHCHECK --interval=999999999999999999m CMD true\n").unwrap_err();
    assert_eq!(err.line, 2);
    assert!(err.message.contains("too long"), "{}", err.message);
}

/// Found by the `template` fuzz target: a value that repeats itself grows exponentially line by
/// line, so a spec of a few hundred bytes made the planner allocate until it was killed.
#[test]
fn expansion_is_bounded() {
    let mut text = "FROM base\nENV A=aaaaaaaa\n".to_owned();
    for _ in 0..12 {
        text.push_str("ENV A=$A$A$A$A$A$A$A$A\n");
    }
    let spec = parse(&text).unwrap();
    let err = spec.plan(&ImageConfig::default()).unwrap_err();
    assert!(err.message.contains("bytes"), "{}", err.message);
    let long = "x".repeat(words::MAX_EXPANDED / 2 + 1);
    assert!(expand("$A$A", &env(&[("A", &long)])).is_err());
    assert!(expand("$A", &env(&[("A", &long)])).is_ok());
}

/// Every plan step carries the configuration in force, so the number of steps is bounded too.
#[test]
fn the_number_of_steps_is_bounded() {
    let mut text = "FROM base\n".to_owned();
    for i in 0..MAX_STEPS {
        text.push_str(&format!("ENV V{i}=1\n"));
    }
    assert_eq!(parse(&text).unwrap().steps.len(), MAX_STEPS);
    text.push_str("RUN true\n");
    let err = parse(&text).unwrap_err();
    assert_eq!(err.line, MAX_STEPS + 2);
}
