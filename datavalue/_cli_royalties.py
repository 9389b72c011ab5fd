"""``datavalue royalties``: a period statement from a royalty ledger, as HTML, JSON or CSV.

A thin layer over :class:`datavalue.shapley.RoyaltyLedger` and
:func:`datavalue.shapley.write_report`. Wire it into the main parser with::

    subparsers = parser.add_subparsers(dest="command")
    _cli_royalties.add_parser(subparsers)
    ...
    args = parser.parse_args()
    if args.command == "royalties":
        return args.handler(args)        # or _cli_royalties.run(args)

Usage::

    datavalue royalties LEDGER --period START:END --out report.html [--format html|json|csv]
    datavalue royalties LEDGER --period START:END --out - --format json     # to standard output
                        [--overwrite] [--aggregation share-then-sum|average-then-share]
                        [--registry owners.json] [--key-file PATH | env DATAVALUE_LEDGER_KEY]
                        [--unverified]

A keyed ledger (``RoyaltyLedger(path, key=...)``) is read with its key, so that every row's and the
head's MAC is checked: from ``--key-file PATH`` (the file's bytes, one trailing newline removed) or
the environment variable ``DATAVALUE_LEDGER_KEY`` (its text); never from a plain argument, which
would land in the shell history. Without the key a keyed ledger is refused (exit 2), unless
``--unverified`` is given (the report is written, and stdout and stderr say its MACs were not checked).

Exit codes: 0 written, 2 an error (message on stderr; e.g. --out is the ledger itself) or a usage
error (argparse).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Any

__all__ = ["KEY_ENV", "add_parser", "check_out_path", "run"]

#: Environment variable holding a keyed ledger's key (text); ``--key-file`` takes precedence.
KEY_ENV = "DATAVALUE_LEDGER_KEY"

logger = logging.getLogger(__name__)


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:  # type: ignore[type-arg]
    """Register the ``royalties`` subcommand on ``subparsers`` and return its parser."""
    p = subparsers.add_parser(
        "royalties",
        help="write a per-owner royalty statement for a period",
        description=(
            "Read a royalty ledger (JSON lines written by datavalue.shapley.RoyaltyLedger), "
            "verify its hash chain, aggregate the rows of a period per owner and write a report."
        ),
        usage=(
            "datavalue royalties LEDGER --period START:END --out report.html "
            "[--format html|json|csv] [--overwrite] [--key-file PATH] [--unverified]"
        ),
        epilog=(
            f"A keyed ledger is read with its key, from --key-file or the environment variable {KEY_ENV}, and every "
            "MAC is checked; without it the command refuses the ledger unless --unverified is given."
        ),
    )
    p.add_argument("ledger", metavar="LEDGER", help="path of the ledger (.jsonl)")
    p.add_argument(
        "--period",
        required=True,
        metavar="START:END",
        help="half-open period [START, END) as ISO dates or datetimes, e.g. "
        "2025-01-01:2025-02-01; either side may be empty",
    )
    p.add_argument("--out", required=True, metavar="PATH",
                   help="report file to write; '-' writes it to standard output (needs --format)")
    p.add_argument(
        "--format",
        choices=("html", "json", "csv"),
        default=None,
        help="report format (default: from the --out extension; a known extension must agree with it)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace --out if it already exists")
    p.add_argument(
        "--aggregation",
        choices=("share-then-sum", "average-then-share"),
        default="share-then-sum",
        help="sum per-output amounts (default) or split the period pool by mean values",
    )
    p.add_argument(
        "--registry", default=None, metavar="JSON", help="owner registry (merges shell owners)"
    )
    p.add_argument(
        "--key-file",
        default=None,
        metavar="PATH",
        help=f"file holding the key of a keyed ledger (its bytes, one trailing newline removed); else ${KEY_ENV}",
    )
    p.add_argument(
        "--unverified",
        action="store_true",
        help="read a keyed ledger without its key: MACs are not checked (rows removed from its end go unnoticed)",
    )
    p.set_defaults(handler=run)
    return p


def run(args: argparse.Namespace) -> int:
    """Execute ``datavalue royalties``; returns the process exit code."""
    from datavalue import shapley

    if args.out == "-":
        return _run_to_stdout(args)
    try:
        out = check_out_path(args.out, shapley.ShapleyError)
        _refuse_input_as_output(out, ledger=args.ledger, registry=args.registry)
        from datavalue.shapley.royalties import check_output_path

        # inside a run, or another ledger's file: the API's rule, before any work (exists: below)
        check_output_path(out, what="the report", overwrite=True, ledgers=(args.ledger,), hint=" for --out")
        fmt = shapley.infer_format(args.out, format=args.format)  # a --format the --out suffix contradicts: refused
        if out.exists() and not args.overwrite:
            raise shapley.OutputExistsError(
                f"{out} already exists; refusing to overwrite it. Pass --overwrite or choose "
                "another --out."
            )
        period = shapley.Period.parse(args.period)
        ledger, unverified = _open_ledger(args)
        registry = shapley.OwnerRegistry.load(args.registry) if args.registry else None
        statement = ledger.statement(period, aggregation=args.aggregation, registry=registry)
        try:
            shapley.write_report(statement, out, format=fmt, overwrite=args.overwrite)
        except OSError as exc:
            if isinstance(exc, shapley.ShapleyError):
                raise
            raise shapley.ShapleyError(f"cannot write {out}: {exc.strerror or exc}; choose a writable --out.") from exc
    except shapley.ShapleyError as exc:
        print(f"datavalue royalties: error: {exc}", file=sys.stderr)
        return 2  # same exit code as the main CLI for a DataValueError
    print(
        f"wrote {fmt} statement for {statement.n_generations} outputs, "
        f"{len(statement.owners)} owners, paid {statement.paid_total} {statement.currency} "
        f"to {out}" + (" (keyed ledger read WITHOUT its key: MACs not checked, --unverified)" if unverified else "")
    )
    if unverified:
        print(f"datavalue royalties: warning: {args.ledger} is keyed and was read without its key (--unverified): "
              "the report's rows were not checked against their MACs.", file=sys.stderr)
    return 0


def _open_ledger(args: argparse.Namespace) -> tuple[Any, bool]:
    """The ledger ``args`` names, read with its key (``--key-file`` / :data:`KEY_ENV`); refuses a keyed
    ledger read without its key unless ``--unverified``. Returns ``(ledger, unverified)``."""
    from datavalue import shapley
    from datavalue._files import unexpanded_home_problem

    for what, given in (("LEDGER", args.ledger), ("--registry", getattr(args, "registry", None))):
        home = None if given is None else unexpanded_home_problem(given, what, creating=False, cli=True)
        if home is not None:  # a quoted '~/l.jsonl': said in the command line's words (issue 22)
            raise shapley.LedgerNotFoundError(home)
    key, source = _ledger_key(getattr(args, "key_file", None))
    try:
        ledger = shapley.RoyaltyLedger(args.ledger, create=False, key=key)
    except shapley.LedgerError as exc:
        if key is None:
            raise
        raise shapley.LedgerError(f"{exc} (The key was taken from {source}.)") from exc
    unverified = ledger.keyed and key is None
    if unverified and not getattr(args, "unverified", False):
        raise shapley.LedgerError(
            f"{args.ledger} is a keyed ledger (every row and its head carry an HMAC), but no key was given, so "
            "rows removed from its end or rewritten would go unnoticed and nothing was written. Pass --key-file "
            f"PATH (a file holding the key) or set the environment variable {KEY_ENV}; to write the report without "
            "checking the MACs, pass --unverified."
        )
    return ledger, unverified


def _run_to_stdout(args: argparse.Namespace) -> int:
    """``--out -``: the statement on standard output (``--format`` required, no suffix to read it
    from); the summary line goes to standard error. The report writer writes the text to stdout, in
    UTF-8 whatever the locale's encoding, as it writes a report file."""
    import io

    from datavalue import shapley

    try:
        if args.format is None:
            raise shapley.ShapleyError(
                "--out - writes the statement to standard output, which has no file extension to take the format "
                "from; pass --format html, json or csv."
            )
        if args.overwrite:
            raise shapley.ShapleyError("--overwrite has no meaning with --out - (standard output); drop it.")
        period = shapley.Period.parse(args.period)
        ledger, unverified = _open_ledger(args)
        registry = shapley.OwnerRegistry.load(args.registry) if args.registry else None
        statement = ledger.statement(period, aggregation=args.aggregation, registry=registry)
        stream = getattr(sys.stdout, "buffer", None)
        if stream is None:  # a text-only stdout (e.g. redirected in a test)
            shapley.write_report(statement, sys.stdout, format=args.format)
        else:
            sys.stdout.flush()
            out = io.TextIOWrapper(stream, encoding="utf-8")
            try:
                shapley.write_report(statement, out, format=args.format)
                out.flush()
            finally:
                out.detach()  # stdout's own buffer stays open
    except shapley.ShapleyError as exc:
        print(f"datavalue royalties: error: {exc}", file=sys.stderr)
        return 2
    print(
        f"wrote {args.format} statement for {statement.n_generations} outputs, "
        f"{len(statement.owners)} owners, paid {statement.paid_total} {statement.currency} to standard output"
        + (" (keyed ledger read WITHOUT its key: MACs not checked, --unverified)" if unverified else ""),
        file=sys.stderr,
    )
    return 0


def _ledger_key(key_file: str | None) -> tuple[bytes | None, str]:
    """The ledger key and where it came from: ``--key-file`` (the file's bytes, one trailing
    newline removed), else the environment variable :data:`KEY_ENV`, else ``(None, "")``."""
    from datavalue import shapley

    if key_file is not None:
        from datavalue._files import unexpanded_home_problem

        home = unexpanded_home_problem(key_file, "--key-file", creating=False, cli=True)
        if home is not None:
            raise shapley.ShapleyError(home)
        try:
            data = Path(key_file).read_bytes()
        except OSError as exc:
            raise shapley.ShapleyError(
                f"cannot read --key-file {key_file}: {exc.strerror or exc}; give the path of a readable file holding "
                "the ledger's key."
            ) from exc
        data = data[:-2] if data.endswith(b"\r\n") else data[:-1] if data.endswith(b"\n") else data
        if not data:
            raise shapley.ShapleyError(f"--key-file {key_file} is empty; it must hold the ledger's key.")
        return data, f"--key-file {key_file}"
    text = os.environ.get(KEY_ENV)
    if text is None:
        return None, ""
    if not text:
        raise shapley.ShapleyError(
            f"the environment variable {KEY_ENV} is set but empty; set it to the ledger's key, or unset it to read an "
            "unkeyed ledger."
        )
    return text.encode("utf-8"), f"the environment variable {KEY_ENV}"


def check_out_path(path: str | os.PathLike[str], error: Any, *, flag: str = "--out") -> Path:
    """Refuse, before any work, an output path that cannot be written: a directory, a path under a
    regular file, or a directory without write permission (the nearest existing ancestor is checked;
    missing directories are created by the writer). Shared by every writing command; it lives here
    because this module may import only the standard library, ``datavalue.shapley`` and
    ``datavalue.errors`` (tests/shapley/test_reports_cli.py)."""
    from datavalue._files import unexpanded_home_problem

    home = unexpanded_home_problem(path, flag, cli=True)
    if home is not None:  # a quoted '~/r.html' reaches us unexpanded; Python does not expand it (issue 22)
        raise error(home)
    out = Path(path)
    if out.is_dir():
        raise error(f"{flag} {out} is a directory; give the path of a file to write (a new name inside it, for example).")
    parent = out.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise error(f"{flag} {out}: {parent} is a file, not a directory, so nothing can be written under it; choose "
                    f"another {flag}.")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise error(f"{flag} {out}: no permission to write in {parent}; choose a directory you can write to.")
    return out


def _same_file(a: Path, b: Path) -> bool:
    """Whether two paths name one file: the same path once resolved (``..``, symlinks), or one
    inode (a hard link)."""
    if a.resolve() == b.resolve():
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist
        return False


def _refuse_input_as_output(out: Path, *, ledger: str, registry: str | None) -> None:
    """Refuse an ``--out`` that is one of the command's inputs or a file the ledger owns (its head
    file, lock, torn-line and replaced-head files): ``--overwrite`` would replace the ledger, its
    anchor (or the owner registry) with the report, and the hash-chained rows would be gone."""
    from datavalue import shapley
    from datavalue.shapley.royalties import owned_by

    own = owned_by(ledger, out)
    if own is not None and own != "ledger":
        raise shapley.LedgerError(
            f"--out {out} is {'the ' + own if own != 'file' else 'a file'} of the ledger {ledger} (the ledger keeps "
            f"<ledger>.head, <ledger>.lock, <ledger>.torn-* and <ledger>.head.replaced-* beside it); writing the report "
            "there would replace it. Choose another --out (e.g. report.html)."
        )
    for what, src in (("ledger", ledger), ("owner registry", registry)):
        if src is not None and _same_file(out, Path(src)):
            raise shapley.LedgerError(
                f"--out {out} is the {what} {src} this command reads; writing the report there would "
                f"replace the {what}. Choose another --out (e.g. report.html)."
            )


def main(argv: list[str] | None = None) -> int:
    """Standalone entry point (``python -m datavalue._cli_royalties``) for testing."""
    parser = argparse.ArgumentParser(prog="datavalue")
    subparsers = parser.add_subparsers(dest="command", required=True)
    add_parser(subparsers)
    args = parser.parse_args(argv)
    return int(args.handler(args))


if __name__ == "__main__":
    raise SystemExit(main())
