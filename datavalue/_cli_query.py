"""``datavalue query``: the most helpful and harmful training data for a test set, to Parquet.

A thin layer over :class:`datavalue.query.Attributor`::

    datavalue query runs/x.zarr --model mypkg.models:trained --data mypkg.data:test_set \\
        --top-k 10 --out results.parquet [--by sample|occurrence|step] [--curvature fisher] [--overwrite]

``--model`` names a function returning the model with the weights to explain. ``--data`` names a
function returning either ``loss_fn`` (``model -> (m,)`` per-example losses) or a tuple ``(x, y)``,
scored with per-example cross-entropy. A function is ``module:function`` or
``path/to/file.py:function``.

The lead wires :func:`add_parser` into the main parser; :func:`run` returns the exit status.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from datavalue.errors import DataValueError, QueryError, StoreError, StoreExistsError

logger = logging.getLogger(__name__)

USAGE = ("datavalue query RUN --model module:function --data module:function --out results.parquet "
         "[--top-k 10] [--by sample|occurrence|step] [--curvature NAME] [--overwrite]")


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``query`` on ``parser.add_subparsers(dest="command")``; sets ``func=run``."""
    p = subparsers.add_parser(
        "query",
        usage=USAGE,
        help="rank training data by influence on a test set (top-k helpful and harmful) and write Parquet",
        description=(
            "Score every training occurrence of a recorded run against test points and write the most helpful and "
            "most harmful to Parquet. Sign: score = loss(without) - loss(with); positive = helpful."
        ),
    )
    p.add_argument("run", metavar="RUN", help="the recorded run (*.zarr) with built embeddings")
    p.add_argument("--model", required=True, metavar="MOD:FN",
                   help="function returning the model at the weights to explain (module:function or file.py:function)")
    p.add_argument("--data", required=True, metavar="MOD:FN",
                   help="function returning loss_fn(model) -> (m,) per-example losses, or a tuple (x, y) for "
                        "per-example cross-entropy")
    _add_output_args(p)
    p.add_argument("--curvature", default=None, help="embedding build to use (default: fisher, else empirical_fisher)")
    p.add_argument("--kind", choices=("dvemb", "grad_dot", "tracin"), default=None,
                   help="dvemb: built embeddings (default); tracin / grad_dot: raw recorded gradients")
    p.add_argument("--steps", default=None, metavar="T0:T1", help="only occurrences of steps T0 <= t < T1 (negative: from the end, e.g. --steps -100:)")
    p.add_argument("--chunk-rows", type=int, default=None, dest="chunk_rows", help="embedding rows per streamed chunk")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--no-progress", action="store_true", dest="no_progress", help="hide progress bars")
    p.set_defaults(func=run)
    return p


def _add_output_args(p: argparse.ArgumentParser) -> None:
    """``--out``, ``--top-k`` and ``--by``, the same for ``query`` and ``replay``."""
    p.add_argument("--out", required=True, help="output Parquet file")
    p.add_argument("--top-k", type=int, default=10, dest="top_k",
                   help="how many helpful and harmful per test point (default 10; 0 writes every score)")
    p.add_argument("--by", choices=("sample", "occurrence", "step"), default="sample",
                   help="rank samples (all epochs summed, default), single occurrences, or steps")


def _check_output_args(args: argparse.Namespace) -> Path:
    """Refuse, before any work, what ``query`` and ``replay`` both refuse: an ``--out`` that cannot be
    written (:func:`check_out_writable`), lies inside the run, is not named as Parquet or exists without
    ``--overwrite``, and a negative ``--top-k``. Returns ``--out`` as a path."""
    out = check_out_writable(args.out, QueryError)
    if Path(args.run).exists() and out.resolve().is_relative_to(Path(args.run).resolve()):
        raise StoreError(f"--out {out} lies inside the run {args.run}; writing there would change the run. "
                         "Choose a path outside it.")
    check_parquet_name(out)
    if out.exists() and not args.overwrite:
        raise StoreExistsError(f"{out} already exists; pass --overwrite to replace it.")
    if args.top_k < 0:
        raise QueryError(f"--top-k must be >= 0, got {args.top_k}.")
    return out


def run(args: argparse.Namespace) -> int:
    """Execute ``datavalue query``; returns the exit status (0 ok, 1 error)."""
    try:
        return _run(args)
    except DataValueError as exc:
        print(f"datavalue query: error: {exc}", file=sys.stderr)
        return 1


def _run(args: argparse.Namespace) -> int:
    from datavalue.query import Attributor, load_loss, load_model

    out = _check_output_args(args)
    model = load_model(args.model)
    loss_fn = load_loss(args.data)
    by = None if args.by == "occurrence" else args.by
    steps = parse_steps_arg(args.steps)
    attr = Attributor(args.run, model, curvature=args.curvature, kind=args.kind, chunk_rows=args.chunk_rows,
                      progress=not args.no_progress)
    logger.info("%r", attr)
    try:
        if args.top_k > 0:
            res = attr.top_k(loss_fn, k=args.top_k, by=by, steps=steps)
            path = attr.save_parquet(res, out, overwrite=args.overwrite)
            n = len(res.to_frame())
        else:
            scores = attr.scores(loss_fn, by=by, steps=steps)
            path = attr.save_parquet(scores, out, by=by, steps=steps, overwrite=args.overwrite)
            n = scores.shape[1]
    except OSError as exc:
        if isinstance(exc, DataValueError):
            raise
        raise QueryError(f"cannot write {out}: {exc.strerror or exc}; choose a writable --out.") from exc
    print(f"wrote {n} rows to {path} ({attr.kind}, curvature={attr.curvature}, by={args.by})")
    return 0


def check_parquet_name(out: Path) -> None:
    """Refuse an ``--out`` whose name says another format: the file written is Parquet (the rule of
    the query package's writer, :func:`datavalue.query.check_parquet_name`)."""
    from datavalue.query import check_parquet_name as _rule

    _rule(out, flag="--out")


def parse_steps_arg(text: str | None) -> tuple[int | None, int | None] | None:
    """``"T0:T1"`` (either side may be empty) to a step window."""
    if text is None:
        return None
    a, sep, b = text.partition(":")
    if not sep:
        raise QueryError(f"--steps must look like T0:T1 (either side may be empty), got {text!r}.")
    try:
        return (int(a) if a else None, int(b) if b else None)
    except ValueError:
        raise QueryError(f"--steps must look like T0:T1 with integers, got {text!r}.") from None


# ----------------------------------------------------------------------------- datavalue replay
REPLAY_USAGE = ("datavalue replay RUN --model module:function --train module:function --data module:function "
                "--out results.parquet [--top-k 10] [--by sample|occurrence|step] [--name NAME] [--overwrite]")


def add_replay_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``replay`` on ``parser.add_subparsers(dest="command")``; sets ``func=run_replay``."""
    p = subparsers.add_parser(
        "replay",
        usage=REPLAY_USAGE,
        help="exact first-order influence of every training occurrence on a test set, by replaying the run",
        description=(
            "Replay a run recorded with Recorder(..., checkpoint_every=N) backwards from its checkpoints: the exact "
            "first-order influence of every occurrence on the test points of --data, stored in the run "
            "(replay/<name>) and written to Parquet. Sign: score = loss(without) - loss(with); positive = helpful."
        ),
    )
    p.add_argument("run", metavar="RUN", help="the recorded run (*.zarr), with checkpoints")
    p.add_argument("--model", required=True, metavar="MOD:FN",
                   help="function returning the model's architecture (its weights are replaced by the checkpoints)")
    p.add_argument("--train", required=True, metavar="MOD:FN",
                   help="function returning (batches, loss_fn): batches(ids) -> batch and loss_fn(model, batch) -> "
                        "(b,) per-example losses; or a tuple (x, y) indexed by sample id, scored with cross-entropy")
    p.add_argument("--data", required=True, metavar="MOD:FN",
                   help="function returning the query: loss_fn(model) -> (m,) losses, or a tuple (x, y)")
    _add_output_args(p)
    p.add_argument("--name", default="default", help="store the scores as replay/NAME in the run (default 'default')")
    p.add_argument("--steps", default=None, metavar="T0:T1", help="only occurrences of steps T0 <= t < T1 (negative: from the end, e.g. --steps -100:)")
    p.add_argument("--overwrite", action="store_true", help="replace --out and a stored replay of the same name")
    p.add_argument("--no-progress", action="store_true", dest="no_progress", help="hide the progress bar")
    p.set_defaults(func=run_replay)
    return p


def run_replay(args: argparse.Namespace) -> int:
    """Execute ``datavalue replay``; returns the exit status (0 ok, 1 error)."""
    try:
        return _run_replay(args)
    except DataValueError as exc:
        print(f"datavalue replay: error: {exc}", file=sys.stderr)
        return 1


def _train_spec(value: Any, spec: str) -> tuple[Any, Any]:
    import torch
    import torch.nn.functional as F

    if isinstance(value, Sequence) and len(value) == 2 and all(callable(v) for v in value):
        return value[0], value[1]
    if isinstance(value, Sequence) and len(value) == 2:
        x, y = (torch.as_tensor(v) for v in value)
        return (lambda ids: (x[torch.as_tensor(ids)], y[torch.as_tensor(ids)]),
                lambda model, b: F.cross_entropy(model(b[0]), b[1], reduction="none"))
    raise QueryError(f"--train {spec} must return (batches, loss_fn) or a tuple (x, y); got {type(value).__name__}.")


def check_out_writable(path: str, error: Any) -> Path:
    """Refuse, before any work, an ``--out`` that cannot be written: the shared checks of
    :func:`datavalue._cli_royalties.check_out_path` (a directory, a path under a file, no permission),
    then a real try: a hidden empty file is created beside it (in its nearest existing directory)
    and removed, which catches what permission bits do not tell (``/proc``, a read-only mount, root)."""
    import os
    import uuid

    from datavalue._cli_royalties import check_out_path

    out = check_out_path(path, error)
    parent = out.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    probe = parent / f".{out.name}.{uuid.uuid4().hex[:8]}.writable"
    try:
        fd = os.open(probe, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
    except OSError as exc:
        raise error(f"--out {out}: cannot create a file in {parent} ({exc.strerror or exc}); choose a writable "
                    "--out.") from None
    os.close(fd)
    os.unlink(probe)
    return out


def _run_replay(args: argparse.Namespace) -> int:
    from datavalue.query import load_loss, load_model, replay_influence, resolve_callable

    out = _check_output_args(args)  # before the replay runs and is stored in the run
    model = load_model(args.model)
    batches, loss_fn = _train_spec(resolve_callable(args.train, "--train")(), args.train)
    query = load_loss(args.data)
    steps = parse_steps_arg(args.steps)
    if steps is not None:
        from datavalue.store import open_run

        T = open_run(args.run).n_steps
        steps = (0 if steps[0] is None else steps[0], T if steps[1] is None else steps[1])
    res = replay_influence(args.run, model, batches, query, loss_fn=loss_fn, name=args.name, steps=steps,
                           description=f"--data {args.data}", overwrite=args.overwrite, progress=not args.no_progress)
    by = None if args.by == "occurrence" else args.by
    try:
        if args.top_k > 0:
            path = res.save_parquet(out, by=by, top_k=args.top_k, overwrite=args.overwrite)
        else:
            path = res.save_parquet(out, by=by, overwrite=args.overwrite)
    except OSError as exc:  # changed since the check (disk full, removed directory): stored, not written
        if isinstance(exc, DataValueError):
            raise
        raise QueryError(f"cannot write {out}: {exc.strerror or exc}. The scores are stored in the run as "
                         f"replay/{args.name}: write them with ReplayResult.open(run, {args.name!r}).save_parquet(path)"
                         ".") from exc
    checks = ", ".join(f"{k}: {v:.1e}" for k, v in res.attrs["checks"].items())
    print(f"replayed {res.n_rows} occurrences x {res.n_test} test points in {res.attrs['seconds']:.1f} s "
          f"(checkpoint checks {checks}); stored as replay/{args.name}; wrote {path} (by={args.by})")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Stand-alone entry (``python -m datavalue._cli_query RUN ...``)."""
    parser = argparse.ArgumentParser(prog="datavalue")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["query", *(sys.argv[1:] if argv is None else argv)])
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
