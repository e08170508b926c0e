"""Template builds through the SDK's `Template()` builder: E2B's template routes (`/v3/templates`,
file uploads by hash, `/v2/templates/{id}/builds/{build}`, build status with logs, aliases, tags)
on Vivarium's layer builder.

Builds under TCG take minutes, so there are few of them: one module-scoped build covers most
behaviours (base image, env, copies with globs, modes and symlinks, run as another user,
symlinks, workdir, start and ready commands, tags at build time), a second builds from it in the
background (status and logs), rebuilds show the cache and `skip_cache`, and a failing build
checks the error for a user that does not exist.
"""

import os
import time
import uuid

import pytest
from e2b import Sandbox, Template, wait_for_port
from e2b.exceptions import BuildException, TemplateException

RUN = uuid.uuid4().hex[:6]
NAME = f"sdk-app-{RUN}"
CHILD = f"sdk-child-{RUN}"


@pytest.fixture(scope="module")
def context(tmp_path_factory):
    root = tmp_path_factory.mktemp("context")
    (root / "files").mkdir()
    (root / "files" / "a.txt").write_text("alpha\n")
    (root / "files" / "b.txt").write_text("beta\n")
    (root / "files" / "skip.md").write_text("not copied\n")
    (root / "tree").mkdir()
    (root / "tree" / "target.txt").write_text("target\n")
    (root / "tree" / "run.sh").write_text("#!/bin/sh\necho ran\n")
    os.symlink("target.txt", root / "tree" / "link")
    (root / "resolved").mkdir()
    os.symlink("../tree/target.txt", root / "resolved" / "link")
    return root


@pytest.fixture(scope="module")
def built(context):
    """One build of many steps, tagged v1 and stable; its logs."""
    template = (
        Template(file_context_path=str(context))
        .from_base_image()
        .set_envs({"GREETING": "hello", "TARGET": "world"})
        .copy("files/*.txt", "data")
        .copy("tree", "/opt/tree", mode=0o755)
        .copy("resolved", "/opt/resolved", resolve_symlinks=True)
        .run_cmd('test "$(whoami)" = root && touch /root/ran-as-root', user="root")
        .run_cmd(["whoami > /home/user/whoami.txt", "echo build-step-output-$GREETING"])
        .make_symlink("/home/user/whoami.txt", "/home/user/who-link")
        .set_workdir("/home/user/data")
        .set_start_cmd(
            "echo $GREETING-$TARGET > /tmp/started && python3 -m http.server 8000",
            wait_for_port(8000),
        )
    )
    logs = []
    started = time.monotonic()
    info = Template.build(template, f"{NAME}:v1", tags=["stable"], on_build_logs=logs.append)
    return info, logs, time.monotonic() - started


def run(sbx, cmd, **kw):
    result = sbx.commands.run(cmd, **kw)
    return result.stdout.strip()


def test_build_runs_every_step_and_sandboxes_start_from_it(built):
    info, logs, _ = built
    assert info.name == f"{NAME}:v1"
    assert set(info.tags) == {"v1", "stable"}
    messages = [entry.message for entry in logs]
    assert any("build-step-output-hello" in m for m in messages), messages
    sbx = Sandbox.create(f"{NAME}:v1", timeout=300)
    try:
        # Env from set_envs, for steps, the start command and sandboxes.
        assert run(sbx, "echo $GREETING $TARGET") == "hello world"
        assert run(sbx, "cat /tmp/started") == "hello-world"
        # The start command runs; the ready command waited for its port.
        assert "Directory listing" in run(sbx, "curl -s localhost:8000/")
        # E2B's default user, the last workdir.
        assert run(sbx, "whoami") == "user"
        assert run(sbx, "pwd") == "/home/user/data"
        # A glob copy goes into a directory relative to the workdir then in force.
        assert run(sbx, "cat /home/user/data/a.txt /home/user/data/b.txt") == "alpha\nbeta"
        assert run(sbx, "ls /home/user/data") == "a.txt\nb.txt"
        # A directory copy with a mode; its symlink stays a symlink.
        assert run(sbx, "stat -c %a /opt/tree/run.sh") == "755"
        assert run(sbx, "/opt/tree/run.sh") == "ran"
        assert run(sbx, "readlink /opt/tree/link") == "target.txt"
        assert run(sbx, "cat /opt/tree/link") == "target"
        # resolve_symlinks copies the file the link points to.
        assert run(sbx, "test -L /opt/resolved/link || echo regular") == "regular"
        assert run(sbx, "cat /opt/resolved/link") == "target"
        # run_cmd as root and as the default user; make_symlink.
        assert run(sbx, "test -e /root/ran-as-root && echo yes", user="root") == "yes"
        assert run(sbx, "cat /home/user/whoami.txt") == "user"
        assert run(sbx, "readlink /home/user/who-link") == "/home/user/whoami.txt"
    finally:
        sbx.kill()


def test_exists_and_tags(built):
    info, _, _ = built
    assert Template.exists(NAME)
    assert Template.exists(f"{NAME}:stable")
    assert not Template.exists(f"nothing-{RUN}")
    tags = {t.tag: t.build_id for t in Template.get_tags(NAME)}
    assert tags == {"v1": info.build_id, "stable": info.build_id}

    assigned = Template.assign_tags(f"{NAME}:v1", ["prod", f"{NAME}:canary"])
    assert assigned.build_id == info.build_id
    assert set(assigned.tags) == {"prod", f"{NAME}:canary"}
    assert {t.tag for t in Template.get_tags(NAME)} == {"v1", "stable", "prod", "canary"}
    sbx = Sandbox.create(f"{NAME}:prod", timeout=120)
    try:
        assert run(sbx, "cat /home/user/whoami.txt") == "user"
    finally:
        sbx.kill()

    Template.remove_tags(NAME, ["prod", "canary"])
    assert {t.tag for t in Template.get_tags(NAME)} == {"v1", "stable"}
    with pytest.raises(TemplateException):
        Template.remove_tags(NAME, "prod")
    with pytest.raises(TemplateException):
        Template.assign_tags(f"{NAME}:missing", "x")


def test_background_build_from_template_status_cache_and_skip_cache(built):
    template = (
        Template()
        .from_template(f"{NAME}:stable")
        .run_cmd("date +%s%N > /home/user/stamp && echo child-step", user="user")
    )
    info = Template.build_in_background(template, CHILD)
    assert info.template_id == CHILD
    status = Template.get_build_status(info)
    assert status.status.value in ("building", "ready")
    deadline = time.monotonic() + 1200
    logs = []
    while True:
        status = Template.get_build_status(info, logs_offset=len(logs))
        logs.extend(status.log_entries)
        if status.status.value in ("ready", "error"):
            break
        assert time.monotonic() < deadline, "the background build did not end"
        time.sleep(1)
    assert status.status.value == "ready", status.reason
    assert any("child-step" in e.message for e in logs), [e.message for e in logs]

    def stamp():
        sbx = Sandbox.create(CHILD, timeout=120)
        try:
            # The parent's files and start command are there too.
            assert run(sbx, "cat /home/user/whoami.txt") == "user"
            return run(sbx, "cat /home/user/stamp")
        finally:
            sbx.kill()

    first = stamp()
    # Unchanged: every step comes from the cache.
    again = []
    Template.build(template, CHILD, on_build_logs=again.append)
    assert any("CACHED" in e.message and "date +%s%N" in e.message for e in again), [e.message for e in again]
    assert stamp() == first
    # skip_cache reruns the steps.
    forced = []
    Template.build(template, CHILD, skip_cache=True, on_build_logs=forced.append)
    assert not any("CACHED" in e.message and "date +%s%N" in e.message for e in forced)
    assert stamp() != first


def test_run_as_a_user_that_does_not_exist_fails_clearly(built):
    template = Template().from_template(f"{NAME}:v1").run_cmd("whoami", user="root123")
    with pytest.raises(BuildException) as failure:
        Template.build(template, f"sdk-fail-{RUN}")
    message = str(failure.value)
    assert "root123" in message and "does not exist" in message, message
    assert not Template.exists(f"sdk-fail-{RUN}")


def test_bad_definitions_are_refused():
    with pytest.raises(BuildException) as failure:
        Template.build(Template().from_template(f"missing-{RUN}"), f"sdk-bad-{RUN}")
    assert f"missing-{RUN}" in str(failure.value)
