"""``datavalue`` command line: a thin layer over the public API.

Commands: ``info RUN``, ``build RUN``, ``query RUN ...``, ``royalties LEDGER ...``, ``demo``.
Writing commands refuse to overwrite without ``--overwrite``.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import json
import logging
import os
import re
import sys
from collections.abc import Sequence
from typing import Any


def _fmt_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024
    return str(n)


def _cannot_write(out: Any, exc: OSError, error: Any) -> Exception:
    return error(f"cannot write {out}: {exc.strerror or exc}; choose a writable path (nothing was written there).")


def cmd_info(args: argparse.Namespace) -> int:
    from datavalue.store import open_run

    run = open_run(args.run)
    _check_recorded_sizes(run)
    info = run.info()
    info["builds"] = _builds(run, args.run, info["embeddings"])
    damaged = {name: meta["damaged"] for name, meta in info["builds"].items() if "damaged" in meta}
    info["checkpoints"] = sorted(int(s) for s in run.subgroups("checkpoints")
                                 if s.isdigit() and run.has_array(f"checkpoints/{s}/meta"))
    info["replays"] = [n for n in run.subgroups("replay") if run.has_array(f"replay/{n}/scores")]
    if args.json:
        print(json.dumps(info, indent=2, default=str))
        return _report_damaged(damaged)
    print(f"run            {info['path']}  (schema v{info['schema_version']})")
    print(f"steps          {info['steps']}")
    print(f"occurrences    {info['occurrences']}")
    print(f"unique samples {info['unique_samples']}")
    print(f"epochs         {info['epochs']}")
    print(f"columns (k)    {info['proj_dim']}  [{info['projection']}]")
    print(f"storage dtype  {info['storage_dtype']}")
    print(f"loss reduction {info['loss_reduction']}")
    print(f"optimizer      {info['optimizer']}")
    if info["lr_range"]:
        print(f"lr range       {info['lr_range'][0]:g} .. {info['lr_range'][1]:g}")
    print(f"fisher rows    {info['fisher_rows'] if info['fisher_rows'] is not None else 'not recorded'}")
    print(f"hessian        {'recorded (k x k per step)' if info.get('hessian') else 'not recorded'}")
    print(f"non-finite     {info['nonfinite_rows']} rows flagged")
    print(f"embeddings     {', '.join(info['embeddings']) or 'none built (datavalue build RUN)'}")
    for name, meta in info["builds"].items():
        first, *rest = _build_lines(meta)
        print(f"  {name}: {first}")
        for line in rest:
            print(f"    {line}")
    print(f"checkpoints    {info['checkpoints'] or 'none (Recorder(..., checkpoint_every=N) keeps them)'}")
    print(f"replays        {', '.join(info['replays']) or 'none (datavalue replay RUN ...)'}")
    print(f"size on disk   {_fmt_bytes(info['size_bytes'])}")
    print("blocks:")
    for name, rule, k in info["blocks"]:
        print(f"  {name:36s} {rule:22s} k={k}")
    return _report_damaged(damaged)


def _check_recorded_sizes(run: Any) -> None:
    """Refuse a run whose committed gradient (or Fisher) chunk file is not one chunk's size (truncated, or
    bytes appended): ``open_run`` leaves such a chunk to the checksum of the first read, so ``info`` said
    nothing (exit 0) while every build and query refused the run (P9-12). A ``stat`` per chunk, no read."""
    from datavalue.store import ChunkFileRows, fast_rows

    for name, n in (("grads", run.n_rows), ("fisher", run.n_fisher_rows if run.has_fisher else 0)):
        rows = fast_rows(run.array(name), required_rows=n) if n else None
        if isinstance(rows, ChunkFileRows):
            rows.check_sizes(n)


def _report_damaged(damaged: dict[str, str]) -> int:
    """Exit 1 naming each damaged build on stderr (after the report), else 0."""
    for name, why in damaged.items():
        print(f"datavalue info: build {name!r} is damaged: {why}", file=sys.stderr)
    return 1 if damaged else 0


def _builds(run: Any, path: str, names: Sequence[str]) -> dict[str, dict]:
    """Each build's stored metadata (its choice of curvature and blocks, steps, completeness); a
    finished build whose values miss a chunk it covers, or hold one of another size, gets ``"damaged"``
    (the check_build presence and size check: a listing and a ``stat`` per chunk, no read)."""
    from datavalue.embeddings import build_metadata, require_build_chunks
    from datavalue.errors import DataValueError, StoreCorruptError

    out = {}
    for name in names:
        try:
            out[name] = build_metadata(path, name)
        except StoreCorruptError as exc:  # its metadata edited or damaged (P9-11): as damaged as a lost chunk
            out[name] = {"error": str(exc), "damaged": str(exc)}
            continue
        except DataValueError as exc:  # e.g. a group left without values by an interrupted build
            out[name] = {"error": str(exc)}
            continue
        if out[name].get("complete"):  # an unfinished build says so already
            try:
                _require_run_steps(run, out[name])
                require_build_chunks(run, name)
            except StoreCorruptError as exc:
                out[name]["damaged"] = str(exc)
    return out


def _require_run_steps(run: Any, meta: dict) -> None:
    """Refuse a finished build whose recorded step and row counts no prefix of the run has (P9-11: an
    edited ``n_steps`` showed as ``10**18 steps, complete``, exit 0, while every query refused the build).
    A build of fewer steps than the run (recorded further since) is a prefix: extend it, not damaged."""
    from datavalue.errors import StoreCorruptError

    spans = meta.get("blocks")
    if isinstance(spans, list) and spans and not isinstance(spans[0], str):
        edges = [0] + [int(b) for a, b in spans]
        if [int(a) for a, _ in spans] != edges[:-1] or edges[-1] != run.proj_dim:
            raise StoreCorruptError(
                f"the build's column blocks {spans!r:.80} do not tile the run's {run.proj_dim} gradient columns: its "
                "metadata was edited, or it was copied from another run. Every query refuses it; rebuild with --overwrite.")
    n_steps, n_rows = meta.get("n_steps"), meta.get("n_rows")
    if not isinstance(n_steps, int) or "checkpoint_step" in meta:
        return
    if n_steps > run.n_steps or (isinstance(n_rows, int) and n_rows != int(run.step_ptr[n_steps])):
        raise StoreCorruptError(
            f"the build says it was made from {n_steps} steps ({n_rows} occurrences), but the run's first {n_steps} "
            f"steps are not that (the run has {run.n_steps} steps, {run.n_rows} occurrences): its metadata was edited, "
            "or it was copied from another run. Every query refuses it; rebuild with --overwrite."
        )


def _build_lines(meta: dict) -> list[str]:
    if "error" in meta:
        return [meta["error"]]
    state = "complete" if meta.get("complete") else "UNFINISHED (rebuild with --overwrite)"
    if "damaged" in meta:
        state = ("DAMAGED: a chunk is missing or truncated (see below; rebuild with --overwrite)" if "chunk" in meta["damaged"]
                 else "DAMAGED: its metadata does not match the run (see below; rebuild with --overwrite)")
    choice = meta["choice"]
    head = f"{meta.get('n_steps', '?')} steps, {state}"
    # the Fisher pooled over steps t-W..t+W (0: each step's own): a line of its own, so W = 0 shows too
    window = [f"fisher_window: {meta.get('fisher_window', 0)}"] if meta.get("curvature") == "fisher" else []
    if "blocks_reason" not in choice:  # built before the choice was recorded
        return [head, choice["summary"], *window]
    return [
        head,
        f"curvature: {choice['curvature']} ({choice['curvature_reason']})",
        choice["summary"][choice["summary"].index("blocks: "):],
        *window,
    ]


def cmd_build(args: argparse.Namespace) -> int:
    from datavalue.embeddings import build_embeddings

    window = {} if args.fisher_window is None else {"fisher_window": args.fisher_window}
    out = build_embeddings(args.run, curvature=args.curvature, segments=args.segments, overwrite=args.overwrite,
                           dtype=args.dtype, blocks=args.blocks, **window)
    print(f"embeddings built in {out.seconds:.1f} s: {out.array}, {out.n_rows} rows, {out.n_steps} steps")
    print(out.choice)
    return 0


def _fisher_window(text: str) -> int | str:
    """``--fisher-window``: ``auto`` or a decimal int (its range is checked by the build, with the library's message)."""
    if text == "auto":
        return text
    try:
        return int(text, 10)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an int >= 0 or 'auto', got {text!r}") from None


def cmd_archive(args: argparse.Namespace) -> int:
    from datavalue._cli_royalties import check_out_path  # the writing commands' shared output check
    from datavalue.errors import StoreError
    from datavalue.store import archive_run

    check_out_path(args.out, StoreError, flag="OUT")
    try:
        out = archive_run(args.run, args.out, overwrite=args.overwrite)
    except OSError as exc:
        if isinstance(exc, StoreError):
            raise
        raise _cannot_write(args.out, exc, StoreError) from exc
    print(f"wrote {out} ({_fmt_bytes(out.stat().st_size)}); open it with datavalue.open_run({str(out)!r})")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from datavalue.demo import run_demo

    run_demo(args.out, n_train=args.n_train, epochs=args.epochs, proj_dim=args.proj_dim, seed=args.seed,
             overwrite=args.overwrite, progress=not args.quiet)
    return 0


def build_parser() -> argparse.ArgumentParser:
    from datavalue import __version__

    parser = argparse.ArgumentParser(prog="datavalue", description="Training-data attribution and valuation.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    # (was: `datavalue --version` said "the following arguments are required: command"; P8-11)
    parser.add_argument("--version", action="version", version=f"datavalue {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("info", help="print a run's manifest, steps, occurrences, size")
    p.add_argument("run")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("build", help="build data value embeddings of a run")
    p.add_argument("run")
    p.add_argument("--curvature", default=None, choices=["none", "empirical_fisher", "fisher", "hessian"],
                   help="default: hessian if recorded, else fisher if recorded, else empirical_fisher")
    p.add_argument("--segments", type=int, default=1)
    p.add_argument("--dtype", default="float64", choices=["float64", "float32"])
    p.add_argument("--blocks", default="auto", choices=["auto", "layer", "full"],
                   help="auto (default): one operator over all columns for the true Fisher and the exact Hessian "
                        "while it fits 256 MiB and the sketch keeps >= 1/4 of the dimensions, else one per layer "
                        "block; layer: one per layer block (the paper's form); full: one over all columns")
    p.add_argument("--fisher-window", default=None, type=_fisher_window, metavar="W",
                   help="curvature fisher: pool step t's recorded Fisher over steps t-W..t+W (an int >= 0, or auto: "
                        "see datavalue.build_embeddings; default: the library's)")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_build)

    p = sub.add_parser("archive", help="pack a run into one .zip that open_run/Attributor read directly")
    p.add_argument("run")
    p.add_argument("out", help="the archive path, ending in .zip")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_archive)

    p = sub.add_parser("demo", help="train an MLP on real MNIST with the recorder and explain a few test digits")
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--n-train", type=int, default=4000)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--proj-dim", type=int, default=1024)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the demo's outputs in --out (run.zarr, top_k.txt, demo.png); nothing else there")
    p.set_defaults(func=cmd_demo)

    for name, mod in (("query", "datavalue._cli_query"), ("royalties", "datavalue._cli_royalties")):
        try:
            m = importlib.import_module(mod)
        except ModuleNotFoundError as exc:  # optional command not installed in this build
            if exc.name != mod:
                raise
            continue
        m.add_parser(sub)
        sub.choices[name].set_defaults(func=m.run)
        if name == "query":  # `datavalue replay` lives beside `datavalue query`
            m.add_replay_parser(sub)
    return parser


def check_run_argument(path: Any, command: str) -> None:
    """Refuse a RUN argument that lies inside a datavalue run without being one (``RUN/grads``,
    ``RUN/zarr.json``, as tab completion gives), naming the run to pass instead. A run inside a run
    (the final pass ``RUN/final``) is a run and passes; a path that is not there is left to
    ``open_run`` (its "no datavalue run" says what is wrong)."""
    import os
    from pathlib import Path

    from datavalue._files import inside_run
    from datavalue.errors import StoreNotFoundError
    from datavalue.store import run_location, what_is

    if not isinstance(path, str) or not path:
        return
    loc = run_location(path)  # a file:// URL: the local path it names; '::' refused (RunPathError)
    if "://" in loc:
        return
    p = Path(loc)
    if not (p.exists() or p.is_symlink()) or what_is(p) == "run":
        return
    outer = inside_run(p)
    if outer is None or outer == Path(os.path.realpath(p)):
        return
    real = Path(os.path.realpath(p))
    outer = next((d for d in real.parents if what_is(d) == "run"), outer)  # the nearest run (RUN/final/grads)
    if p.name == "zarr.json":
        what = "the metadata file (zarr.json) of"
    elif p.is_dir() and (p / "zarr.json").is_file():
        try:
            node = json.loads((p / "zarr.json").read_text(encoding="utf-8")).get("node_type")
        except (OSError, ValueError, AttributeError):
            node = None
        what = {"array": "an array inside", "group": "a group inside"}.get(node, "a part of")
    else:
        what = "a file inside" if p.is_file() else "a part of"
    raise StoreNotFoundError(
        f"{path} is {what} the datavalue run {outer}, not a run: pass the run's directory "
        f"(datavalue {command} {outer})."
    )


#: Options whose value may start with ``-`` (a negative step, e.g. ``--steps -1:``): argparse reads
#: such a value as another option ("expected one argument"), so it is joined to the option first.
_NEGATIVE_VALUE_OPTIONS = ("--steps",)
_STEP_WINDOW = re.compile(r"^-?\d*:-?\d*$")


def join_negative_values(argv: Sequence[str]) -> list[str]:
    """``["--steps", "-1:"]`` becomes ``["--steps=-1:"]`` (a step window with a negative end), as the
    user meant; anything else is left to argparse. Tokens after ``--`` are never touched."""
    out: list[str] = []
    it = iter(range(len(argv)))
    args = list(argv)
    for i in it:
        tok = args[i]
        if tok == "--":
            out.extend(args[i:])
            break
        if tok in _NEGATIVE_VALUE_OPTIONS and i + 1 < len(args) and args[i + 1].startswith("-") \
                and _STEP_WINDOW.match(args[i + 1]):
            out.append(f"{tok}={args[i + 1]}")
            next(it, None)
            continue
        out.append(tok)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(join_negative_values(sys.argv[1:] if argv is None else argv))
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        if hasattr(args, "run"):  # every command with a RUN argument
            check_run_argument(args.run, args.command)
        code = int(args.func(args) or 0)
        sys.stdout.flush()  # a reader that closed early fails here, inside the handler below
        return code
    except BrokenPipeError:
        return _stdout_closed()
    except Exception as exc:
        from datavalue.errors import DataValueError

        if isinstance(exc, DataValueError):
            print(f"datavalue: error: {exc}", file=sys.stderr)
            return 2
        if isinstance(exc, OSError) and exc.errno in (errno.EROFS, errno.EACCES):  # a write no check foresaw
            print(f"datavalue: error: {_unwritable_message(exc)}", file=sys.stderr)
            return 2
        if isinstance(exc, OSError) and exc.errno in _FULL:  # a full disk (standard output too: `> /dev/full`)
            print(f"datavalue: error: {_full_message(exc)}", file=sys.stderr)
            _drop_unwritable_stdout()
            return 1
        raise


#: errno values of a write that found no room: the disk (or the user's quota) is full, or the file too big.
_FULL = tuple(getattr(errno, n) for n in ("ENOSPC", "EDQUOT", "EFBIG") if hasattr(errno, n))


def _full_message(exc: OSError) -> str:
    """One line for a write that found no room (P9-03: was a raw ``OSError`` traceback)."""
    what = f"writing {exc.filename}" if exc.filename else "writing the output (standard output or a file it writes)"
    return (f"{what} failed: {exc.strerror or exc} (errno {exc.errno}). Free space on that file system (or write "
            "the output elsewhere) and run the command again (with --overwrite where it wrote part of an output; "
            "`datavalue info RUN` names a build left unfinished).")


def _drop_unwritable_stdout() -> None:
    """Point standard output at ``/dev/null`` when what it still buffers cannot be written, so that the
    interpreter's flush at exit does not print a second traceback (``Exception ignored ...``)."""
    try:
        sys.stdout.flush()
    except (OSError, ValueError):
        _stdout_closed()


def _stdout_closed() -> int:
    """The reader of standard output went away (``datavalue info RUN | head -3``): stop quietly, as
    other command-line tools do, with the shell's status for SIGPIPE (141), and point standard output
    at ``/dev/null`` so that the interpreter's own flush at exit does not print a traceback (P8-03)."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):  # no file descriptor behind sys.stdout (a test's capture)
        pass
    return 141


def _unwritable_message(exc: OSError) -> str:
    """One line for a read-only file system or a refused permission that no datavalue check named."""
    what = f"{exc.filename}" if exc.filename else "a path this command uses"
    if exc.errno == errno.EROFS:
        return (f"{what} is on a read-only file system, and this command writes there: run it on a writable copy "
                "(copy the run to a writable place) or give a writable path.")
    return (f"{what}: permission denied for this user ({exc.strerror}): get access to it, or run the command on a "
            "copy you can write.")


if __name__ == "__main__":
    sys.exit(main())
