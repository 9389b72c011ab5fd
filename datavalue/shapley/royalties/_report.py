"""Royalty reports in three formats: JSON (machines), CSV (accounting), HTML (people).

All three render a :class:`PeriodStatement`. The HTML page is self-contained (inline CSS and
inline SVG, no scripts, no external assets): a summary with the reconciliation, the owner
table, a bar chart of owner shares, a per-output stacked breakdown and each owner's summed value
with a +-2 standard error bar. Writers refuse to replace an existing file unless
``overwrite=True``; the format is inferred from the extension when not given. :func:`write_report`
also writes to an open text stream (``sys.stdout``, ``io.StringIO``), with the format given.
"""

from __future__ import annotations

import io
import json
import os
from decimal import Decimal
from html import escape
from pathlib import Path
from typing import Any, TextIO, overload

from datavalue.shapley._errors import InvalidGameError, OutputPathError
from datavalue.shapley.royalties._outpath import check_output_path, write_text_output
from datavalue.shapley.royalties._statement import PeriodStatement
from datavalue.shapley.royalties._svg import bar_chart, error_bar_chart, stacked_columns

__all__ = ["FORMATS", "infer_format", "render_report", "write_report"]

FORMATS = ("html", "json", "csv")
_EXTENSIONS = {".html": "html", ".htm": "html", ".json": "json", ".csv": "csv"}
_MAX_COLUMNS = 120  # generations drawn in the breakdown chart


def _render_json(st: PeriodStatement) -> str:
    return json.dumps(st.to_dict(), indent=2, sort_keys=False) + "\n"


# A cell starting with one of these is a formula to Excel, LibreOffice and Google Sheets.
_FORMULA_PREFIXES = ("=", "+", "-", "@", "\t", "\r")


def _cell(text: str) -> str:
    """A text cell made safe for spreadsheets (OWASP, "CSV injection"): a leading ``=``, ``+``,
    ``-``, ``@``, tab or carriage return gets a single quote in front, so an owner named
    ``=HYPERLINK("http://evil","x")`` is shown as that text, never run as a formula."""
    return "'" + text if text.startswith(_FORMULA_PREFIXES) else text


class _CsvRows:
    """RFC 4180 rows with ``\n`` line ends: a field holding a comma, a quote, CR or LF is quoted.

    ``csv.writer(lineterminator="\n")`` leaves a field with a bare CR unquoted, and readers then
    split the row there; for every other field the output is the same as ``csv.writer``'s.
    """

    def __init__(self) -> None:
        self._lines: list[str] = []

    def writerow(self, fields: list[object]) -> None:
        cells = (str(f) for f in fields)
        self._lines.append(",".join('"' + c.replace('"', '""') + '"' if any(ch in c for ch in ',"\r\n') else c
                                    for c in cells))

    def text(self) -> str:
        return "".join(line + "\n" for line in self._lines)


def _render_csv(st: PeriodStatement) -> str:
    """The statement as CSV for accounting, one row per owner plus ``unallocated`` and ``pool_total``.

    Text fields (``owner``, ``name``, ``currency``, ``aggregation``, ``policies``) come from users
    and are escaped with :func:`_cell` (a leading formula character gets a ``'``). Numeric
    fields (amounts, shares, counts, values: ``-12.34`` included) are written as plain numbers,
    never escaped, so they stay numbers in a spreadsheet and parse back exactly.
    """
    w = _CsvRows()
    start = "" if st.period.start is None else st.period.start.isoformat()
    end = "" if st.period.end is None else st.period.end.isoformat()
    w.writerow(
        ["period_start", "period_end", "kind", "owner", "name", "amount", "currency", "share",
         "n_generations", "n_paid", "value_sum", "value_stderr", "aggregation", "policies"]
    )  # fmt: skip
    common = [_cell(st.aggregation), _cell(";".join(st.policies))]
    cur = _cell(st.currency)
    for o in st.owners:
        w.writerow(
            [start, end, "owner", _cell(o.owner), _cell(o.name), str(o.amount), cur, f"{o.share:.6f}",
             o.n_generations, o.n_paid, repr(o.value_sum), repr(o.value_stderr), *common]
        )  # fmt: skip
    w.writerow([start, end, "unallocated", "", "", str(st.unallocated_total), cur, "",
                st.n_no_positive, "", "", "", *common])  # fmt: skip
    w.writerow([start, end, "pool_total", "", "", str(st.pool_total), cur, "",
                st.n_generations, "", "", "", *common])  # fmt: skip
    return w.text()


_CSS = """
body{font-family:sans-serif;max-width:980px;margin:2em auto;color:#222}
table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px}
td.num{text-align:right;font-variant-numeric:tabular-nums}th{background:#f3f3f3}
.ok{color:#2a7a2a}.bad{color:#b00020}.note{color:#666;font-size:90%}
"""


def _money(d: Decimal, cur: str) -> str:
    return f"{d:,} {cur}"


def _render_html(st: PeriodStatement) -> str:
    cur = escape(st.currency)
    ok = st.reconciles
    rows = "\n".join(
        f"<tr><td>{escape(o.name)}</td><td>{escape(o.owner)}</td>"
        f'<td class="num">{escape(_money(o.amount, st.currency))}</td>'
        f'<td class="num">{100 * o.share:.2f}%</td><td class="num">{o.n_generations}</td>'
        f'<td class="num">{o.n_paid}</td><td class="num">{o.value_sum:.6g}</td>'
        f'<td class="num">{o.value_stderr:.3g}</td></tr>'
        for o in st.owners
    )
    labels = [o.name for o in st.owners]
    shares = bar_chart(
        labels,
        [float(o.amount) for o in st.owners],
        title=f"Owner amounts ({st.currency})",
        value_labels=[f"{o.amount} ({100 * o.share:.1f}%)" for o in st.owners],
    )
    gens = st.generations[:_MAX_COLUMNS]
    owner_ids = [o.owner for o in st.owners]
    breakdown = stacked_columns(
        [g.output_id for g in gens],
        labels,
        [[float(g.amounts.get(o, 0)) for o in owner_ids] for g in gens],
        title="Amount per output, by owner",
        unit=f" {st.currency}",
    )
    truncated = (
        f'<p class="note">Showing the first {_MAX_COLUMNS} of {st.n_generations} outputs.</p>'
        if st.n_generations > _MAX_COLUMNS
        else ""
    )
    uncertainty = error_bar_chart(
        labels,
        [o.value_sum for o in st.owners],
        [2.0 * o.value_stderr for o in st.owners],
        title="Summed value per owner, \u00b12 standard errors",
    )
    period = escape(st.period.label())
    status = (
        '<span class="ok">reconciles exactly</span>'
        if ok
        else '<span class="bad">DOES NOT RECONCILE</span>'
    )
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>Royalty statement {period}</title>
<style>{_CSS}</style></head><body>
<h1>Royalty statement</h1>
<p>Period <b>{period}</b> &middot; aggregation <b>{escape(st.aggregation)}</b> &middot;
policies <b>{escape(", ".join(st.policies) or "none")}</b> &middot; {st.n_generations} outputs</p>
<table>
<tr><th>Pool total</th><td class="num">{escape(_money(st.pool_total, st.currency))}</td></tr>
<tr><th>Paid to owners</th><td class="num">{escape(_money(st.paid_total, st.currency))}</td></tr>
<tr><th>Unallocated</th><td class="num">{escape(_money(st.unallocated_total, st.currency))}</td></tr>
<tr><th>Outputs with no positive contributor</th><td class="num">{st.n_no_positive}</td></tr>
<tr><th>Reconciliation</th><td>{status}</td></tr>
</table>
<h2>Owners</h2>
<table><tr><th>Owner</th><th>Id</th><th>Amount ({cur})</th><th>Share</th><th>Outputs</th>
<th>Paid outputs</th><th>Value sum</th><th>Std. error</th></tr>
{rows}
</table>
<h2>Shares</h2>
{shares}
<h2>Per-output breakdown</h2>
{truncated}
{breakdown}
<h2>Uncertainty</h2>
<p class="note">Values are the owners' (Shapley) contributions summed over the period's outputs;
bars show &plusmn;2 standard errors of the estimators (zero for exact enumeration).</p>
{uncertainty}
</body></html>
"""


def render_report(statement: PeriodStatement, format: str = "html") -> str:  # noqa: A002
    """Render a statement as ``"html"``, ``"json"`` or ``"csv"`` text.

    Example:
        >>> from datavalue.shapley.royalties._records import Period
        >>> from datavalue.shapley.royalties._statement import build_statement
        >>> st = build_statement([], period=Period())
        >>> render_report(st, "csv").splitlines()[0].split(",")[:4]
        ['period_start', 'period_end', 'kind', 'owner']
    """
    if format not in FORMATS:
        raise InvalidGameError(f"format must be one of {FORMATS}; got {format!r}.")
    return {"html": _render_html, "json": _render_json, "csv": _render_csv}[format](statement)


def infer_format(path: str | os.PathLike[str], *, format: str | None = None) -> str:  # noqa: A002
    """Report format from a file extension (``.html``, ``.htm``, ``.json``, ``.csv``), or the
    ``format`` given, which a known extension must then agree with.

    Raises:
        InvalidGameError: no ``format`` and any other extension (the message lists the known ones),
            or a ``format`` that is not one of :data:`FORMATS`.
        OutputPathError: ``format`` and a known extension disagree (``r.csv`` with ``format="html"``):
            the file would hold one format under another's name. Any other extension (``.txt``,
            none) takes the ``format`` given.

    Example:
        >>> infer_format("out/2025-01.HTM"), infer_format("statement.csv")
        ('html', 'csv')
        >>> infer_format("statement.txt", format="csv")
        'csv'
    """
    ext = Path(path).suffix.lower()
    if format is not None:
        if format not in FORMATS:
            raise InvalidGameError(f"format must be one of {FORMATS}; got {format!r}.")
        named = _EXTENSIONS.get(ext)
        if named is not None and named != format:
            raise OutputPathError(
                f"{path} ends in {Path(path).suffix}, the suffix of {named.upper()} reports, but the report is "
                f"written as {format.upper()} (format={format!r}, --format {format} on the command line): the file "
                f"would hold {format.upper()} under a {named.upper()} name, so nothing was written. Name it "
                f"{Path(path).with_suffix('.' + format).name!r}, or pass format={named!r}."
            )
        return format
    if ext not in _EXTENSIONS:
        raise InvalidGameError(
            f"cannot infer the report format from {str(path)!r}; expected an extension in "
            f"{sorted(_EXTENSIONS)}. Pass format='html' | 'json' | 'csv'."
        )
    return _EXTENSIONS[ext]


def _write_stream(stream: Any, text: str) -> None:
    """Write ``text`` to an open stream in one call: a text stream takes it as is, a binary one (``BytesIO``,
    ``sys.stdout.buffer``, a file opened ``"wb"``) its UTF-8 bytes, the bytes a file would hold. A closed
    stream, or one not open for writing, is refused before anything is written (P8-08: was a raw
    ``TypeError`` / ``ValueError`` / ``io.UnsupportedOperation``)."""
    name = type(stream).__name__
    if getattr(stream, "closed", False):
        raise OutputPathError(f"write_report: the stream ({name}) is closed; open it again (or pass another). "
                              "Nothing was written.")
    writable = getattr(stream, "writable", None)
    try:
        ok = writable() if callable(writable) else True
    except (OSError, ValueError):
        ok = False
    if not ok:
        raise OutputPathError(f"write_report: the stream ({name}) is not open for writing (mode "
                              f"{getattr(stream, 'mode', '?')!r}); open it with 'w'. Nothing was written.")
    binary = isinstance(stream, (io.RawIOBase, io.BufferedIOBase)) or "b" in str(getattr(stream, "mode", ""))
    stream.write(text.encode("utf-8") if binary else text)


@overload
def write_report(statement: PeriodStatement, path: str | os.PathLike[str], *, format: str | None = None,  # noqa: A002
                 overwrite: bool = False) -> Path: ...
@overload
def write_report(statement: PeriodStatement, path: TextIO, *, format: str | None = None,  # noqa: A002
                 overwrite: bool = False) -> None: ...
def write_report(
    statement: PeriodStatement,
    path: str | os.PathLike[str] | TextIO,
    *,
    format: str | None = None,  # noqa: A002
    overwrite: bool = False,
) -> Path | None:
    """Write a statement to ``path`` (format from the extension unless given; a given format must
    agree with a known extension: :func:`infer_format`), or to an open text stream.

    The text goes to a temporary beside ``path`` and is moved into place, so a failed write leaves
    no partial file and, with ``overwrite=True``, the previous file as it was. Returns the path.

    A text stream (anything with ``write(str)``: ``sys.stdout``, ``io.StringIO``, a file opened with
    ``open(..., "w")``) gets the same text in one ``write`` (``format`` is required: a stream has no
    extension; ``overwrite`` is not used); the stream is left open. Returns ``None``. A binary stream
    (``io.BytesIO``, ``sys.stdout.buffer``) gets the text's UTF-8 bytes. The path ``"-"`` is refused:
    it is standard output only on the command line.

    Example:
        >>> import io
        >>> from datavalue.shapley.royalties._records import Period
        >>> from datavalue.shapley.royalties._statement import build_statement
        >>> buf = io.StringIO()
        >>> write_report(build_statement([], period=Period()), buf, format="csv")
        >>> buf.getvalue().split(",")[0]
        'period_start'

    Raises:
        OutputExistsError: ``path`` exists and ``overwrite`` is false, or ``path`` is a directory.
        OutputPathError: ``path`` lies inside a datavalue run, is a run archive, or lies under a
            regular file, or its extension names another format than ``format``, or the OS refused
            the write (its reason is given).
        LedgerError: ``path`` is a royalty ledger or one of a ledger's own files (its head file,
            lock, torn-line or replaced-head files), whatever ``overwrite`` says.
        InvalidGameError: a stream and no ``format``, or a ``format`` not in :data:`FORMATS`.
        OutputPathError (too): the path ``"-"``; a stream that is closed or not open for writing.
        Nothing is written in any of these cases.
    """
    if not isinstance(path, (str, os.PathLike)) and callable(getattr(path, "write", None)):
        if format is None:
            raise InvalidGameError(
                f"write_report to a stream ({type(path).__name__}) needs format='html' | 'json' | 'csv': a stream has "
                "no file extension to take the format from. Nothing was written."
            )
        text = render_report(statement, format)  # rendered whole first: a refusal writes nothing
        _write_stream(path, text)
        return None
    if isinstance(path, str) and path == "-":  # the CLI's "standard output", not a file named "-" (P8-09)
        raise OutputPathError(
            "write_report(st, '-') would write a file named '-' in the current directory; '-' means standard "
            "output only on the command line (datavalue royalties --out -). To write to standard output, pass the "
            "stream: write_report(st, sys.stdout, format='csv'); for a file named '-', pass './-'. Nothing was written."
        )
    p = check_output_path(path, what="the report", overwrite=overwrite)
    fmt = infer_format(p, format=format)
    text = render_report(statement, fmt)
    write_text_output(p, text, "the report")
    return p
