"""How numbers and tables look in the terminal: one set of rules for every command's printed output.

Numbers: floats to 4 significant digits, durations as "1.2 s" or "3 min 4 s", memory in GiB, files in MiB,
parameter counts as "494.0M" or "8.03B", a missing value as "-". Tables: `rich` tables rendered to text, styled
only when stdout is a terminal, so piped output, logs and tests stay plain. What the libraries print themselves
(progress bars, log lines) is set here too: off unless the user asks for it with --verbose.
"""

from __future__ import annotations

import io
import logging
import os
import sys
from collections.abc import Collection, Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

MISSING = "-"


def number(value: Any) -> str:
    """A float to 4 significant digits; None as "-"; anything else as str()."""
    if value is None:
        return MISSING
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def duration(seconds: float) -> str:
    """'12.3 s' under 90 seconds, '3 min 4 s' from there on."""
    if seconds < 90:
        return f"{seconds:.1f} s"
    return f"{int(seconds // 60)} min {seconds % 60:.0f} s"


def gib(n_bytes: float) -> str:
    """Memory: '1.23 GiB'."""
    return f"{n_bytes / 2**30:.2f} GiB"


def mib(n_bytes: float) -> str:
    """A file's size: '123 MiB'."""
    return f"{n_bytes / 2**20:.0f} MiB"


def count(n: float) -> str:
    """A parameter count: '494.0M', '8.03B'."""
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def table(columns: Sequence[str], rows: Iterable[Sequence[Any]], *, title: str | None = None,
          right: Collection[str] = (), indent: int = 0, width: int | None = None, header: bool = True) -> str:
    """An aligned text table. Cells go through `number`; a column is right-aligned when every value it has is a
    number, or when it is named in `right`; `header=False` leaves the column names out. Without `width` the table takes the width its cells need (no
    wrapping); with one, long cells fold onto more lines to fit it."""
    from rich import box
    from rich.console import Console
    from rich.padding import Padding
    from rich.table import Table
    from rich.text import Text

    rows = [list(r) for r in rows]
    grid = Table(title=title, box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, show_header=header,
                 title_justify="left")
    for i, name in enumerate(columns):
        values = [r[i] for r in rows if r[i] is not None]
        numeric = bool(values) and all(_is_number(v) for v in values)
        grid.add_column(name, justify="right" if numeric or name in right else "left", overflow="fold")
    for r in rows:
        grid.add_row(*(Text(number(v)) for v in r))  # Text: no rich markup read out of the user's data
    buffer = io.StringIO()
    Console(file=buffer, width=width or 10_000, force_terminal=sys.stdout.isatty(), highlight=False).print(
        Padding(grid, (0, 0, 0, indent), expand=False))
    lines = [line.rstrip() for line in buffer.getvalue().splitlines()]
    while lines and not lines[-1]:
        lines.pop()
    while lines and not lines[0]:
        lines.pop(0)
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ library output
# Each library's own switches for its progress bars and log level, read when it is imported: (variable, quiet value).
QUIET_LIBRARIES = {
    "huggingface_hub": [("HF_HUB_DISABLE_PROGRESS_BARS", "1"), ("HF_HUB_VERBOSITY", "error")],
    "transformers": [("TRANSFORMERS_VERBOSITY", "error"), ("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")],
    "datasets": [("HF_DATASETS_DISABLE_PROGRESS_BARS", "1"), ("DATASETS_VERBOSITY", "error")],
}


def library_output(verbose: bool) -> None:
    """The libraries' progress bars (downloads, "Loading weights", datasets' map and filter) and their info and
    warning lines: shown with --verbose, else off (errors still print). The one place that sets them, before the
    command imports the libraries (through the variables each one reads at import); a library already imported
    is set through its logging module as well. A variable the user set keeps its value."""
    if verbose:
        return
    for variable, value in (pair for pairs in QUIET_LIBRARIES.values() for pair in pairs):
        os.environ.setdefault(variable, value)
    if "huggingface_hub" in sys.modules:
        from huggingface_hub.utils import disable_progress_bars
        from huggingface_hub.utils import logging as hub_logging

        disable_progress_bars()
        hub_logging.set_verbosity_error()
    if "transformers" in sys.modules:
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()
        transformers_logging.set_verbosity_error()
    if "datasets" in sys.modules:
        from datasets.utils import logging as datasets_logging

        datasets_logging.disable_progress_bar()
        datasets_logging.set_verbosity_error()


@contextmanager
def quiet_hub() -> Iterator[None]:
    """Inside: the Hub client's retry and warning lines ("Retrying in 1s [Retry 1/5]", "couldn't connect") are
    not printed, even with --verbose; for a call whose failure we report in our own words (plan and doctor
    offline)."""
    from huggingface_hub.utils import logging as hub_logging

    logger = hub_logging.get_logger()
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)
