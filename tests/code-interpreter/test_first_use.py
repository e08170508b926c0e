"""First use of the built-in template: a create naming it (here by its alias) before it is built
starts its build and is answered at once with 503 and the build's progress, not left waiting;
once built, the alias and the name both start sandboxes of it."""

import httpx


def test_a_create_before_the_build_starts_it_and_says_so(server):
    status, body, seconds = server.first_use
    assert status == 503, body
    assert "code-interpreter-v1" in body and "being built" in body, body
    assert "viv template build --builtin code-interpreter" in body, body
    assert seconds < 30, f"answered after {seconds:.0f} s"


def test_the_alias_and_the_name_both_start_it(server):
    headers = {"X-API-Key": server.key}
    for name in ("code-interpreter", "code-interpreter-v1"):
        created = httpx.post(server.url + "/sandboxes", headers=headers, json={"templateID": name}, timeout=300)
        assert created.status_code == 201, created.text
        sandbox = created.json()
        assert sandbox["templateID"] == "code-interpreter-v1", sandbox
        assert httpx.delete(f"{server.url}/sandboxes/{sandbox['sandboxID']}", headers=headers, timeout=60).status_code == 204
    info = httpx.get(server.url + "/templates/code-interpreter", headers=headers, timeout=60).json()
    assert info["templateID"] == "code-interpreter-v1", info
