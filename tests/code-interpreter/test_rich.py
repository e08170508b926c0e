"""Rich results: each MIME type a display or a cell's value can carry comes back in its field,
`display()` results are not the main result, pandas DataFrames come back as `data`, PIL images
as PNG."""

import base64
import json

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_each_mime_type_lands_in_its_field(sandbox):
    code = r"""
from IPython.display import display, HTML, Markdown, Latex, SVG, JSON, Javascript
display(HTML('<b>bold</b>'))
display(Markdown('# Title'))
display(Latex(r'$\alpha^2$'))
display(SVG('<svg xmlns="http://www.w3.org/2000/svg" width="4" height="4"><rect width="4" height="4"/></svg>'))
display(JSON({'answer': 42}))
display(Javascript('console.log(1)'))
display({'application/pdf': 'JVBERi0xLjQK'}, raw=True)
display({'text/plain': 'plain and extra', 'application/x-custom+json': {'k': 1}}, raw=True)
'the value'
"""
    execution = sandbox.run_code(code)
    assert execution.error is None, execution.error
    results = execution.results
    assert len(results) == 9, [r.formats() for r in results]
    html, md, latex, svg, js_json, js, pdf, extra, main = results
    assert "<b>bold</b>" in html.html
    assert md.markdown.strip() == "# Title"
    assert "\\alpha^2" in latex.latex
    assert "<rect" in svg.svg
    assert js_json.json == {"answer": 42}
    assert "console.log(1)" in js.javascript
    assert pdf.pdf == "JVBERi0xLjQK"
    assert extra.text == "plain and extra"
    assert extra.extra and json.loads(json.dumps(extra.extra)), extra.extra
    assert main.text == "the value"
    assert [r.is_main_result for r in results] == [False] * 8 + [True]


def test_dataframe_comes_back_as_data_html_and_text(sandbox):
    execution = sandbox.run_code(
        "import pandas as pd\npd.DataFrame({'name': ['a', 'b'], 'score': [1.5, 2.5]})"
    )
    assert execution.error is None, execution.error
    (result,) = execution.results
    assert result.is_main_result
    assert "<table" in result.html
    assert "score" in result.text
    assert result.data is not None, result.formats()
    flat = json.dumps(result.data)
    assert "score" in flat and "2.5" in flat, result.data


def test_pil_image_is_png(sandbox):
    execution = sandbox.run_code(
        "from PIL import Image\nImage.new('RGB', (8, 6), (255, 0, 0))"
    )
    assert execution.error is None, execution.error
    (result,) = execution.results
    raw = base64.b64decode(result.png)
    assert raw.startswith(PNG_MAGIC)
    # Width and height from the IHDR chunk.
    assert int.from_bytes(raw[16:20], "big") == 8 and int.from_bytes(raw[20:24], "big") == 6
