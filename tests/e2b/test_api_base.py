"""What code written for E2B's base template (a python image with a C toolchain and Node.js)
expects to find in a sandbox: `python` and `pip` (not only `python3`), gcc and make, node and
npm, and the usual tools."""


def test_base_has_python_and_the_tools_e2b_base_has(sandbox):
    result = sandbox.commands.run("python -c 'import sys; print(sys.version_info[0] * 14)'")
    assert result.stdout == "42\n"
    assert "python 3" in sandbox.commands.run("pip --version").stdout
    compiled = sandbox.commands.run(
        "cd /tmp && printf 'int main(void){return 42;}' > t.c && gcc -o t t.c && ./t; echo $?"
    )
    assert compiled.stdout.strip() == "42"
    assert sandbox.commands.run("node -e 'console.log(6*7)'").stdout == "42\n"
    for tool in ("python3", "npm", "make", "git", "curl", "sudo", "ps"):
        assert sandbox.commands.run(f"command -v {tool}").exit_code == 0, tool
