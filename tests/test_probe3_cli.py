"""Third probe (issue 22): the command line's bad flags and paths, archives of archives.

Each test failed before its fix: ``datavalue archive RUN out.tar`` printed a ValueError traceback;
``datavalue archive RUN.zip OUT.zip`` wrote an empty zip and said it succeeded; ``FinalPass`` on an
archive raised a raw ``NotADirectoryError``; ``datavalue demo`` printed tracebacks for a count
that is not positive and for an ``--out`` that is a file or lies under one, and ``--epochs 0
--overwrite`` replaced the existing run with an empty one. Rows: docs/errors.md, "Third probe".
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import datavalue
from datavalue import errors as E
from datavalue.cli import main
from datavalue.store import archive_run, open_run


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Linear(4, 3)


def _record(path: Path) -> torch.nn.Module:
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(0)
    with datavalue.Recorder(path, model, optimizer=opt, proj_dim=None) as rec:
        for _ in range(2):
            with rec.step(sample_ids=[0, 1, 2]):
                F.cross_entropy(model(torch.randn(3, 4, generator=g)), torch.tensor([0, 1, 2])).backward()
            opt.step()
            opt.zero_grad()
    return model


@pytest.fixture
def run(tmp_path) -> Path:
    path = tmp_path / "r.zarr"
    _record(path)
    return path


def _one_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    return err


def _tree(root: Path) -> dict[str, bytes | None]:
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None) for p in sorted(root.rglob("*"))}


# ----------------------------------------------------------------------------- archive
def test_archive_name_not_zip_is_one_line_exit_2(run, capsys):
    before = _tree(run.parent)
    assert main(["archive", str(run), str(run.parent / "out.tar")]) == 2
    assert "must end in .zip" in _one_line(capsys)
    assert _tree(run.parent) == before
    with pytest.raises(E.StoreError, match=r"choose e\.g\. out\.zip") as info:  # the API: typed, still a ValueError
        archive_run(run, run.parent / "out.tar")
    assert isinstance(info.value, ValueError)


def test_archive_of_an_archive_is_a_faithful_copy(run, capsys):
    a, b = run.parent / "a.zip", run.parent / "b.zip"
    archive_run(run, a)
    assert main(["archive", str(a), str(b)]) == 0
    assert "wrote" in capsys.readouterr().out
    assert b.read_bytes() == a.read_bytes()  # byte for byte, never an empty zip
    src, dst = open_run(a), open_run(b)
    assert (dst.n_steps, dst.n_rows) == (src.n_steps, src.n_rows) == (2, 6)
    with zipfile.ZipFile(b) as zf:
        assert "zarr.json" in zf.namelist()


def test_archive_onto_itself_is_refused(run, capsys):
    a = run.parent / "a.zip"
    archive_run(run, a)
    data = a.read_bytes()
    assert main(["archive", str(a), str(a), "--overwrite"]) == 2
    err = _one_line(capsys)
    assert "is the archive" in err and "itself" in err
    alias = run.parent / "alias.zip"
    alias.hardlink_to(a)
    with pytest.raises(E.StoreError, match="itself"):
        archive_run(a, alias, overwrite=True)
    assert a.read_bytes() == data


def test_archive_refuses_a_remote_store_and_a_directory_out(run):
    out = run.parent / "o.zip"
    with pytest.raises(E.StoreError, match="remote or in-memory"):  # was: an empty zip of Path('s3:/b/r.zarr')
        archive_run("s3://bucket/r.zarr", out)
    assert not out.exists()
    (run.parent / "d.zip").mkdir()
    with pytest.raises(E.StoreExistsError, match="is a directory"):  # was: a raw IsADirectoryError
        archive_run(run, run.parent / "d.zip", overwrite=True)
    assert (run.parent / "d.zip").is_dir()


def test_final_pass_on_an_archive_is_read_only(run):
    from datavalue.capture import FinalPass

    a = run.parent / "a.zip"
    archive_run(run, a)
    data = a.read_bytes()
    with pytest.raises(E.StoreReadOnlyError, match="read-only"):  # was: a raw NotADirectoryError
        FinalPass(a, _model())
    assert a.read_bytes() == data


# ----------------------------------------------------------------------------- demo
BAD_DEMO_FLAGS = {
    "n-train-zero": (["--n-train", "0"], "--n-train"),
    "n-train-negative": (["--n-train", "-5"], "--n-train"),
    "n-train-beyond-mnist": (["--n-train", "60001"], "1..60000"),
    "epochs-zero": (["--epochs", "0"], "--epochs"),
    "epochs-negative": (["--epochs", "-1"], "--epochs"),
    "proj-dim-zero": (["--proj-dim", "0"], "--proj-dim"),
    "seed-negative": (["--seed", "-1"], "--seed"),
}


@pytest.mark.parametrize("case", sorted(BAD_DEMO_FLAGS))
def test_demo_refuses_bad_numbers_before_any_work(case, tmp_path, capsys):
    extra, said = BAD_DEMO_FLAGS[case]
    out = tmp_path / "demo"
    assert main(["demo", "--quiet", "--out", str(out), *extra]) == 2
    assert said in _one_line(capsys)
    assert not out.exists()  # refused before the output directory is made


@pytest.mark.parametrize("where", ["a-file", "under-a-file", "dangling-link"])
def test_demo_refuses_an_out_that_cannot_be_a_directory(where, tmp_path, capsys):
    f = tmp_path / "afile"
    f.write_text("the user's notes")
    (tmp_path / "link").symlink_to(tmp_path / "nowhere")
    out = {"a-file": f, "under-a-file": f / "sub", "dangling-link": tmp_path / "link"}[where]
    before = _tree(tmp_path)
    assert main(["demo", "--quiet", "--out", str(out)]) == 2
    assert str(out) in _one_line(capsys)
    assert _tree(tmp_path) == before and f.read_text() == "the user's notes"
    assert not (tmp_path / "nowhere").exists()


def test_demo_bad_epochs_with_overwrite_keeps_the_existing_run(tmp_path, capsys):
    out = tmp_path / "demo"
    _record(out / "run.zarr")  # an earlier demo's run
    (out / "top_k.txt").write_text("earlier table\n")
    before = _tree(out)
    # before the fix the recorder replaced the run, recorded no step and the run was lost
    assert main(["demo", "--quiet", "--out", str(out), "--epochs", "0", "--overwrite"]) == 2
    assert "--epochs" in _one_line(capsys)
    assert _tree(out) == before
    assert open_run(out / "run.zarr").n_steps == 2


@pytest.mark.parametrize("kw", [{"n_train": True}, {"n_train": 2.5}, {"n_explain": 0}, {"n_explain": 11}, {"k": 0},
                                {"proj_dim": -1}])
def test_run_demo_refuses_bad_arguments(kw, tmp_path):
    from datavalue.demo import run_demo

    with pytest.raises(E.RecorderError, match="must be an int"):
        run_demo(tmp_path / "demo", progress=False, **kw)
    assert not (tmp_path / "demo").exists()
