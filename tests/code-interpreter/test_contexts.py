"""Contexts: create (language, cwd), list in creation order, isolation of state, restart keeping
the id, removal, and clear answers for unknown ids."""

import pytest
from e2b import InvalidArgumentException, NotFoundException


def test_default_contexts_exist_from_the_start(sandbox):
    languages = [c.language for c in sandbox.list_code_contexts()]
    assert languages[:2] == ["python", "javascript"], languages


def test_contexts_isolate_state_and_have_their_own_cwd(sandbox):
    first = sandbox.create_code_context()
    second = sandbox.create_code_context(cwd="/tmp")
    assert first.language == "python" and first.cwd == "/home/user"
    assert second.cwd == "/tmp"
    assert sandbox.run_code("secret = 'only here'", context=first).error is None
    missing = sandbox.run_code("secret", context=second)
    assert missing.error is not None and missing.error.name == "NameError"
    assert sandbox.run_code("secret", context=first).text == "only here"
    assert sandbox.run_code("import os; os.getcwd()", context=second).text == "/tmp"
    assert sandbox.run_code("import os; os.getcwd()", context=first).text == "/home/user"
    # Listed after the defaults, in creation order.
    ids = [c.id for c in sandbox.list_code_contexts()]
    assert ids.index(first.id) < ids.index(second.id), ids


def test_a_context_of_another_language(sandbox):
    js = sandbox.create_code_context(language="javascript", cwd="/tmp")
    assert js.language == "javascript"
    assert sandbox.run_code("process.cwd()", context=js).text == "/tmp"
    r = sandbox.create_code_context(language="r")
    assert sandbox.run_code("getwd()", context=r).text.strip() == '[1] "/home/user"'


def test_restart_keeps_the_id_and_clears_state(sandbox):
    context = sandbox.create_code_context()
    sandbox.run_code("kept = 1", context=context)
    sandbox.restart_code_context(context)
    after = sandbox.run_code("kept", context=context)
    assert after.error is not None and after.error.name == "NameError"
    assert context.id in [c.id for c in sandbox.list_code_contexts()]
    assert sandbox.run_code("2 + 2", context=context).text == "4"


def test_removed_and_unknown_contexts(sandbox):
    context = sandbox.create_code_context()
    sandbox.remove_code_context(context)
    assert context.id not in [c.id for c in sandbox.list_code_contexts()]
    with pytest.raises(NotFoundException):
        sandbox.run_code("1", context=context)
    with pytest.raises(NotFoundException):
        sandbox.remove_code_context("no-such-context")
    with pytest.raises(NotFoundException):
        sandbox.restart_code_context("no-such-context")


def test_context_and_language_together_are_refused(sandbox):
    context = sandbox.create_code_context()
    with pytest.raises(InvalidArgumentException):
        sandbox.run_code("1", context=context, language="python")
