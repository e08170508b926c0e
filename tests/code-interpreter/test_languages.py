"""Every language the SDK names: its default context keeps state between runs, prints, gives the
last expression's value and reports errors; languages are case-insensitive and have aliases."""

import pytest

# language: (define state, use it → expected text, print → expected stdout, failing code → error name)
LANGUAGES = {
    "javascript": ("const base = 40", "base + 2", "42", "console.log('hi from js')", "hi from js\n",
                   "null.field", "TypeError"),
    "typescript": ("const base: number = 40", "base + 2", "42", "console.log('hi from ts' as string)",
                   "hi from ts\n", "throw new RangeError('too far')", "RangeError"),
    "r": ("base <- 40", "base + 2", "[1] 42", "cat('hi from r\\n')", "hi from r\n",
          # IRkernel names every R condition ERROR.
          "stop('r failed')", "ERROR"),
    "java": ("int base = 40;", "base + 2", "42", "System.out.println(\"hi from java\");", "hi from java\n",
             "Integer.parseInt(\"forty\")", "NumberFormatException"),
    # bash_kernel reports a failing command by its exit status (no exception name or traceback).
    "bash": ("BASE=40", "echo $((BASE + 2))", None, "echo hi from bash", "hi from bash\n",
             "no_such_command_xyz", None),
}


@pytest.mark.parametrize("language", sorted(LANGUAGES))
def test_each_language_keeps_state_prints_and_fails_clearly(sandbox, language):
    define, use, value, printing, printed, failing, error_name = LANGUAGES[language]
    defined = sandbox.run_code(define, language=language)
    assert defined.error is None, defined.error
    used = sandbox.run_code(use, language=language)
    assert used.error is None, used.error
    if value is None:
        assert used.logs.stdout == ["42\n"], used
    else:
        assert used.text.strip() == value, used
    out = sandbox.run_code(printing, language=language)
    assert "".join(out.logs.stdout) == printed, out
    failed = sandbox.run_code(failing, language=language)
    assert failed.error is not None, failed
    if error_name:
        assert error_name in failed.error.name, failed.error
        assert failed.error.traceback, failed.error
    else:
        assert failed.error.value == "127", failed.error
        assert "not found" in "".join(failed.logs.stderr + failed.logs.stdout), failed
    # Still usable, state intact.
    again = sandbox.run_code(use, language=language)
    assert again.error is None and (again.text or "".join(again.logs.stdout)).strip().endswith("42"), again


def test_languages_are_case_insensitive_with_aliases(sandbox):
    assert sandbox.run_code("6 * 7", language="JS").text == "42"
    assert sandbox.run_code("6 * 7", language="Python").text == "42"
    assert sandbox.run_code("const n: number = 6 * 7; n", language="TS").text == "42"


def test_javascript_awaits_and_requires(sandbox):
    awaited = sandbox.run_code("await new Promise((ok) => setTimeout(() => ok('later'), 100))", language="js")
    assert awaited.text == "later", awaited
    required = sandbox.run_code("require('node:path').join('a', 'b')", language="js")
    assert required.text == "a/b", required
