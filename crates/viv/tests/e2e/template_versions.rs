//! Versioned templates: every build is kept as a version `NAME-<hash>` that sandboxes can start
//! from, tags point at versions (a tagged version cannot be deleted), deleting a version frees its
//! own layers; `viv push` builds a project directory's `vivarium.toml` and records the version
//! (an unchanged directory makes none); `viv sandbox commit` saves a sandbox as a new version.

use std::collections::BTreeSet;
use std::path::Path;

use serde_json::{json, Value};

use crate::fixture::TestServer;

fn layer_files(server: &TestServer) -> BTreeSet<String> {
    std::fs::read_dir(server.data_dir.join("layers"))
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

fn history(server: &TestServer, name: &str) -> Vec<Value> {
    let out = server.cli(&["template", "history", name, "--json"]);
    assert_eq!(out.code, 0, "{out:?}");
    serde_json::from_str(&out.stdout).unwrap()
}

fn version_of(server: &TestServer, name: &str) -> String {
    let info: Value = server
        .get(&format!("/templates/{name}"))
        .send()
        .unwrap()
        .json()
        .unwrap();
    info["versionID"]
        .as_str()
        .unwrap_or_else(|| panic!("{info}"))
        .to_owned()
}

fn cat(server: &TestServer, template: &str, file: &str) -> String {
    let id = server.create(json!({ "templateID": template, "timeout": 600 }));
    let out = server.exec(&id, json!({ "command": format!("cat {file}") })).out();
    assert_eq!(server.delete(&format!("/sandboxes/{id}")).send().unwrap().status(), 204);
    out
}

fn build(server: &TestServer, dir: &Path, spec: &str) {
    std::fs::write(dir.join("Dockerfile"), spec).unwrap();
    let built = server.cli(&["template", "build", dir.to_str().unwrap(), "--name", "ver"]);
    assert_eq!(built.code, 0, "{built:?}");
}

#[test]
fn template_versions_history_tags_and_deletes() {
    let server = TestServer::start();
    let context = tempfile::tempdir().unwrap();
    build(&server, context.path(), "FROM base\nRUN echo one > /version.txt\n");
    let v1 = version_of(&server, "ver");
    assert!(v1.starts_with("ver-") && v1.len() == "ver-".len() + 12, "{v1}");
    let layers_v1 = layer_files(&server);
    build(&server, context.path(), "FROM base\nRUN echo two > /version.txt\n");
    let v2 = version_of(&server, "ver");
    assert_ne!(v1, v2);
    let layers_v2: BTreeSet<String> = layer_files(&server).difference(&layers_v1).cloned().collect();
    assert_eq!(layers_v2.len(), 1, "{layers_v2:?}");

    // History: both, oldest first, the second's parent the first, `default` on the second.
    let listed = history(&server, "ver");
    assert_eq!(listed.len(), 2, "{listed:?}");
    assert_eq!(listed[0]["versionID"], v1.as_str());
    assert_eq!(listed[1]["versionID"], v2.as_str());
    assert_eq!(listed[1]["parent"], v1.as_str());
    assert_eq!(listed[1]["tags"], json!(["default"]));
    assert_eq!(listed[0]["tags"], json!([]));
    assert!(listed[1]["sizeBytes"].as_u64().unwrap() > 0, "{listed:?}");
    let table = server.cli(&["template", "history", "ver"]);
    assert!(table.stdout.contains(&v1) && table.stdout.contains(&v2), "{table:?}");
    // Versions are not listed as templates of their own.
    let all: Vec<Value> = server.get("/templates").send().unwrap().json().unwrap();
    assert!(all.iter().all(|t| t["templateID"] != v1.as_str()), "{all:?}");

    // Sandboxes start from either version (CLI by positional id, REST by templateID).
    let from_v1 = server.cli(&["sandbox", "create", &v1]);
    assert_eq!(from_v1.code, 0, "{from_v1:?}");
    let old = from_v1.stdout.trim().to_owned();
    assert_eq!(
        server.exec(&old, json!({ "command": "cat /version.txt" })).out(),
        "one\n"
    );
    assert_eq!(cat(&server, &v2, "/version.txt"), "two\n");
    assert_eq!(cat(&server, "ver", "/version.txt"), "two\n");

    // A tag moves; what it names starts that version.
    let tagged = server.cli(&["template", "tag", "ver:stable", &v1]);
    assert_eq!(tagged.code, 0, "{tagged:?}");
    assert_eq!(cat(&server, "ver:stable", "/version.txt"), "one\n");
    assert_eq!(history(&server, "ver")[0]["tags"], json!(["stable"]));

    // A version a tag points at cannot be deleted: 409 naming the tag.
    let refused = server.delete(&format!("/templates/ver/versions/{v1}")).send().unwrap();
    assert_eq!(refused.status(), 409);
    let text = refused.text().unwrap();
    assert!(text.contains("'stable'"), "{text}");
    let moved = server
        .put("/templates/ver/tags/stable")
        .json(&json!({ "versionID": v2 }))
        .send()
        .unwrap();
    assert_eq!(moved.status(), 200);
    assert_eq!(cat(&server, "ver:stable", "/version.txt"), "two\n");
    // Still used by a sandbox: 409 naming it.
    let in_use = server.delete(&format!("/templates/ver/versions/{v1}")).send().unwrap();
    assert_eq!(in_use.status(), 409);
    assert!(in_use.text().unwrap().contains(&old));
    assert_eq!(
        server.delete(&format!("/sandboxes/{old}")).send().unwrap().status(),
        204
    );

    // Untagged and unused: deleted, and its own layer freed (the other version's stays).
    let deleted = server.delete(&format!("/templates/ver/versions/{v1}")).send().unwrap();
    assert_eq!(deleted.status(), 204);
    assert_eq!(layer_files(&server), layers_v2, "v1's layer is freed, v2's kept");
    let listed = history(&server, "ver");
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_eq!(listed[0]["tags"], json!(["default", "stable"]));
    assert_eq!(
        server
            .post("/sandboxes")
            .json(&json!({ "templateID": v1 }))
            .send()
            .unwrap()
            .status(),
        404
    );
    let gone = server
        .put("/templates/ver/tags/old")
        .json(&json!({ "versionID": v1 }))
        .send()
        .unwrap();
    assert_eq!(gone.status(), 404);

    // Deleting the template's tags deletes its unused versions, and every layer goes.
    assert_eq!(server.cli(&["template", "delete", "ver:stable", "ver"]).code, 0);
    assert!(layer_files(&server).is_empty(), "{:?}", layer_files(&server));
    assert_eq!(server.get("/templates/ver/versions").send().unwrap().status(), 404);
}

#[test]
fn template_versions_push_and_commit() {
    let server = TestServer::start();
    let project = tempfile::tempdir().unwrap();
    let dir = project.path();
    let dir_arg = dir.to_str().unwrap();

    // No vivarium.toml: a message saying how to make one, and a failure.
    let missing = server.cli(&["push", dir_arg]);
    assert_ne!(missing.code, 0);
    assert!(
        missing.stderr.contains("has no vivarium.toml") && missing.stderr.contains("name = \"myapp\""),
        "{missing:?}"
    );

    std::fs::write(dir.join("hello.txt"), "hello from the project\n").unwrap();
    std::fs::write(dir.join("Dockerfile"), "FROM base\nCOPY hello.txt /hello.txt\n").unwrap();
    // Paths must stay inside the directory.
    std::fs::write(dir.join("vivarium.toml"), "name = \"proj\"\ncontext = \"../\"\n").unwrap();
    let escaping = server.cli(&["push", dir_arg]);
    assert_ne!(escaping.code, 0);
    assert!(escaping.stderr.contains("inside the project directory"), "{escaping:?}");

    let toml = "# my project\nname = \"proj\"   # the template\nspec = \"Dockerfile\"\n\n[resources]\nvcpus = 1\n";
    std::fs::write(dir.join("vivarium.toml"), toml).unwrap();
    let first = server.cli(&["push", dir_arg]);
    assert_eq!(first.code, 0, "{first:?}");
    let version = first.stdout.trim().to_owned();
    assert!(version.starts_with("proj-"), "{first:?}");
    let written = std::fs::read_to_string(dir.join("vivarium.toml")).unwrap();
    // The version joins the top-level keys; comments and formatting stay as they were.
    let expected = toml.replace(
        "spec = \"Dockerfile\"\n",
        &format!("spec = \"Dockerfile\"\nversion = \"{version}\"\n"),
    );
    assert_eq!(written, expected);

    // Unchanged (the recorded version in vivarium.toml is not an input): nothing new.
    let second = server.cli(&["push", dir_arg]);
    assert_eq!(second.code, 0, "{second:?}");
    assert_eq!(second.stdout.trim(), format!("up to date: {version}"), "{second:?}");
    assert!(second.stderr.contains("nothing to rebuild"), "{second:?}");
    assert_eq!(history(&server, "proj").len(), 1);
    assert_eq!(std::fs::read_to_string(dir.join("vivarium.toml")).unwrap(), written);

    // A sandbox's setup saved as a new version of the template; new sandboxes of it see it.
    let id = server.create(json!({ "templateID": "proj", "timeout": 600 }));
    let setup = server.exec(
        &id,
        json!({ "command": "echo set up by hand > /home/user/committed.txt && sync" }),
    );
    assert_eq!(setup.exit_code, Some(0), "{setup:?}");
    let committed = server.cli(&["sandbox", "commit", &id, "--template", "proj"]);
    assert_eq!(committed.code, 0, "{committed:?}");
    let commit_version = committed.stdout.trim().to_owned();
    assert!(
        commit_version.starts_with("proj-") && commit_version != version,
        "{committed:?}"
    );
    // The sandbox goes on running.
    assert_eq!(server.exec(&id, json!({ "command": "echo alive" })).out(), "alive\n");
    let listed = history(&server, "proj");
    assert_eq!(listed.len(), 2, "{listed:?}");
    assert_eq!(listed[1]["versionID"], commit_version.as_str());
    assert_eq!(listed[1]["parent"], version.as_str());
    assert_eq!(listed[1]["from"], format!("sandbox:{id}"));
    let child = server.create(json!({ "templateID": "proj", "timeout": 600 }));
    assert_eq!(
        server
            .exec(&child, json!({ "command": "cat /home/user/committed.txt /hello.txt" }))
            .out(),
        "set up by hand\nhello from the project\n"
    );
    // The version before the commit still starts without the file.
    let before = server.create(json!({ "templateID": version, "timeout": 600 }));
    let absent = server.exec(&before, json!({ "command": "test -e /home/user/committed.txt" }));
    assert_eq!(absent.exit_code, Some(1), "{absent:?}");
    // A commit of a sandbox that does not exist: 404.
    let missing = server
        .post("/sandboxes/nosuchsandbox/commit")
        .json(&json!({ "template": "proj" }))
        .send()
        .unwrap();
    assert_eq!(missing.status(), 404);
}

#[test]
fn template_versions_beyond_the_retention_are_deleted_unless_tagged() {
    let server = TestServer::start_with_env(0, &["--keep-versions", "1"], &[]);
    let context = tempfile::tempdir().unwrap();
    build(&server, context.path(), "FROM base\nRUN echo one > /version.txt\n");
    let v1 = version_of(&server, "ver");
    let tagged = server.cli(&["template", "tag", "ver:pinned", &v1]);
    assert_eq!(tagged.code, 0, "{tagged:?}");
    build(&server, context.path(), "FROM base\nRUN echo two > /version.txt\n");
    let v2 = version_of(&server, "ver");
    // v1 is beyond the limit but a tag points at it: kept.
    assert_eq!(history(&server, "ver").len(), 2);
    let deleted = server.cli(&["template", "delete", "ver:pinned"]);
    assert_eq!(deleted.code, 0, "{deleted:?}");
    let layers_v2 = layer_files(&server);
    build(&server, context.path(), "FROM base\nRUN echo three > /version.txt\n");
    let v3 = version_of(&server, "ver");
    let listed: Vec<String> = history(&server, "ver")
        .iter()
        .map(|v| v["versionID"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(
        listed,
        std::slice::from_ref(&v3),
        "v1 and v2 untagged beyond the limit: deleted"
    );
    assert_eq!(
        layer_files(&server).intersection(&layers_v2).count(),
        0,
        "their layers went too"
    );
    assert_eq!(cat(&server, "ver", "/version.txt"), "three\n");
    assert_ne!(v2, v3);
}
