"""IPython extension loaded by the code interpreter's Python kernels at start (`--ext`).

It makes rich results come back the way E2B's SDKs expect:
- matplotlib uses the inline backend: figures are displayed as PNG, and every Figure also gets an
  `e2b/chart` representation (structured chart data from the `e2b_charts` package: line, bar,
  scatter, pie, box and whisker, and a composite `superchart` for several axes);
- pandas DataFrames get an `e2b/data` representation: {column name: [values]}, JSON-safe
  (NaN → null, dates in ISO 8601), next to pandas' own HTML and text;
- PIL images are displayed (PNG) when shown with `.show()` or saved to a file path.
numpy, pandas and matplotlib are imported here so that they are warm in the template snapshot.

Invariants: nothing is added to the user's namespace; a failure to build chart or data
representations never breaks the display of the object (the formatter reports nothing instead);
the directory of this module is removed from the kernel's PYTHONPATH so that the user's
subprocesses do not inherit it.
"""

import json
import os

import matplotlib

matplotlib.use("module://matplotlib_inline.backend_inline")

import matplotlib.pyplot  # noqa: E402  (after choosing the backend)
import numpy  # noqa: E402,F401  (imported to be warm)
import pandas  # noqa: E402
from IPython.core.formatters import BaseFormatter  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from PIL import Image  # noqa: E402
from traitlets import ObjectName, Unicode  # noqa: E402


def _figure_chart(figure: Figure):
    from e2b_charts import chart_figure_to_dict

    try:
        return chart_figure_to_dict(figure) or None
    except Exception:
        return None


def _dataframe_data(frame: pandas.DataFrame):
    try:
        table = json.loads(
            frame.to_json(orient="split", index=False, date_format="iso", default_handler=str)
        )
    except Exception:
        return None
    return {
        str(column): [row[i] for row in table["data"]] for i, column in enumerate(table["columns"])
    }


class ChartFormatter(BaseFormatter):
    """The `e2b/chart` representation of matplotlib figures.

    Figures are recognized here rather than through `for_type`: IPython drops every Figure
    printer from all formatters whenever the inline backend (re)configures its figure formats.
    """

    format_type = Unicode("e2b/chart")
    print_method = ObjectName("_repr_e2b_chart_")
    _return_type = (dict,)

    def __call__(self, obj):
        if self.enabled and isinstance(obj, Figure):
            return _figure_chart(obj)
        return None


class DataFormatter(BaseFormatter):
    """The `e2b/data` representation of pandas DataFrames."""

    format_type = Unicode("e2b/data")
    print_method = ObjectName("_repr_e2b_data_")
    _return_type = (dict,)


def _patch_pil(display) -> None:
    """Showing an image displays it; saving one to a path displays it too (as E2B does)."""
    original_save = Image.Image.save

    def show(image, title=None):
        display(image)

    def save(image, fp, format=None, **params):
        result = original_save(image, fp, format, **params)
        if isinstance(fp, (str, os.PathLike)):
            display(image)
        return result

    Image.Image.show = show
    Image.Image.save = save


def _drop_from_pythonpath() -> None:
    here = os.path.dirname(os.path.abspath(__file__))
    entries = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and p != here]
    if entries:
        os.environ["PYTHONPATH"] = os.pathsep.join(entries)
    else:
        os.environ.pop("PYTHONPATH", None)


def load_ipython_extension(shell) -> None:
    from IPython.display import display

    formatters = shell.display_formatter.formatters
    formatters["e2b/chart"] = ChartFormatter(parent=shell.display_formatter)
    data = DataFormatter(parent=shell.display_formatter)
    data.for_type(pandas.DataFrame, _dataframe_data)
    formatters["e2b/data"] = data
    shell.run_line_magic("matplotlib", "inline")
    _patch_pil(display)
    _drop_from_pythonpath()
