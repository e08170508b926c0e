"""What code written for E2B's base template expects to find in a sandbox."""


def test_base_has_python_and_the_tools_e2b_base_has(sandbox):
    result = sandbox.commands.run("python -c 'import sys; print(sys.version_info[0] * 14)'")
    assert result.stdout == "42\n"
    for tool in ("python3", "pip", "git", "curl", "sudo", "ps"):
        assert sandbox.commands.run(f"command -v {tool}").exit_code == 0, tool
