"""Charts: a matplotlib figure comes back as a PNG plus the chart's structured data, for each kind
E2B knows (line, scatter, bar, pie, box and whisker, and a figure of several as a superchart)."""

import base64

import pytest

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

CHARTS = {
    "line": """
plt.plot([1, 2, 3], [2, 4, 8], label='growth')
plt.plot([1, 2, 3], [1, 1, 1], label='flat')
plt.title('Line chart'); plt.xlabel('day'); plt.ylabel('amount')
""",
    "scatter": """
plt.scatter([1, 2, 3], [3, 1, 2], label='points')
plt.title('Scatter chart'); plt.xlabel('x'); plt.ylabel('y')
""",
    "bar": """
plt.bar(['apples', 'pears', 'plums'], [5, 3, 7], label='fruit')
plt.title('Bar chart'); plt.xlabel('kind'); plt.ylabel('count')
""",
    "pie": """
plt.pie([30, 70], labels=['cats', 'dogs'])
plt.title('Pie chart')
""",
    "box_and_whisker": """
plt.boxplot([[1, 2, 3, 4, 5, 6], [1, 3, 4, 5, 7]], tick_labels=['first', 'second'], patch_artist=True)
plt.title('Box chart'); plt.ylabel('value')
""",
}


def _figure_result(execution):
    assert execution.error is None, execution.error
    figures = [r for r in execution.results if r.png]
    assert len(figures) == 1, [r.formats() for r in execution.results]
    result = figures[0]
    assert base64.b64decode(result.png).startswith(PNG_MAGIC)
    assert result.chart is not None, result.formats()
    return result


@pytest.mark.parametrize("kind", sorted(CHARTS))
def test_each_chart_kind(sandbox, kind):
    execution = sandbox.run_code("import matplotlib.pyplot as plt\n" + CHARTS[kind] + "plt.show()")
    chart = _figure_result(execution).chart
    assert chart.type.value == kind, chart.to_dict()
    assert chart.title.endswith("chart"), chart.to_dict()
    if kind == "line":
        assert chart.x_label == "day" and chart.y_label == "amount"
        assert [e.label for e in chart.elements] == ["growth", "flat"]
        assert [tuple(p) for p in chart.elements[0].points] == [(1, 2), (2, 4), (3, 8)]
    elif kind == "scatter":
        assert [tuple(p) for p in chart.elements[0].points] == [(1, 3), (2, 1), (3, 2)]
    elif kind == "bar":
        assert {(e.label, e.value) for e in chart.elements} == {("apples", 5), ("pears", 3), ("plums", 7)}
    elif kind == "pie":
        assert {e.label for e in chart.elements} == {"cats", "dogs"}
        assert sorted(round(e.angle) for e in chart.elements) == [108, 252]
    elif kind == "box_and_whisker":
        assert [e.label for e in chart.elements] == ["first", "second"]
        assert chart.elements[0].median == 3.5


def test_figure_of_several_charts_is_a_superchart(sandbox):
    code = """
import matplotlib.pyplot as plt
fig, (left, right) = plt.subplots(1, 2)
fig.suptitle('Two charts')
left.plot([1, 2], [3, 4]); left.set_title('left line')
right.bar(['a', 'b'], [1, 2]); right.set_title('right bars')
plt.show()
"""
    chart = _figure_result(sandbox.run_code(code)).chart
    assert chart.type.value == "superchart"
    assert chart.title == "Two charts"
    assert [c.type.value for c in chart.elements] == ["line", "bar"]
    assert [c.title for c in chart.elements] == ["left line", "right bars"]


def test_a_figure_left_open_is_shown_at_the_end_of_the_cell(sandbox):
    execution = sandbox.run_code("import matplotlib.pyplot as plt\nplt.plot([1, 2], [2, 1])\nplt.title('open chart')")
    result = _figure_result(execution)
    assert result.chart.title == "open chart"
