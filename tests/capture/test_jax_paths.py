"""``JaxRecorder`` reads its run location like every other entry point before its resume checks (a
``file://`` URL resumed with another optimizer was accepted: the check looked for the URL as a local
directory and found none), and refuses an unknown ``sketch=`` with a ``RecorderError``, not a bare
``ValueError``; nothing is written in either case."""

import numpy as np
import pytest

from datavalue.errors import DataValueError, RecorderError, StoreMismatchError

jax = pytest.importorskip("jax")
jnp = jax.numpy

from datavalue.capture.jax import JaxRecorder  # noqa: E402


def _case():
    rng = np.random.default_rng(0)
    params = {"w": jnp.asarray(rng.normal(size=(3, 4)).astype(np.float32))}
    x = jnp.asarray(rng.normal(size=(2, 4)).astype(np.float32))
    y = jnp.asarray([0, 1])

    def loss(p, xi, yi):
        return -jax.nn.log_softmax(p["w"] @ xi)[yi]

    return params, loss, x, y


def test_file_url_resume_checks_the_optimizer(tmp_path):
    params, loss, x, y = _case()
    url = (tmp_path / "r.zarr").as_uri()
    with JaxRecorder(url, params, loss, proj_dim=None, optimizer={"kind": "sgd"}) as rec:
        rec.step(params, x, y, sample_ids=[0, 1], lr=0.1)
    with pytest.raises(StoreMismatchError, match="another optimizer"):
        JaxRecorder(url, params, loss, proj_dim=None, optimizer={"kind": "sgd", "momentum": 0.9, "dampening": 0.5}, resume=True)


def test_unknown_sketch_is_a_recorder_error(tmp_path):
    params, loss, _, _ = _case()
    with pytest.raises(RecorderError, match="sketch must be one of") as err:
        JaxRecorder(tmp_path / "r.zarr", params, loss, proj_dim=4, sketch="rademacher")
    assert isinstance(err.value, DataValueError)
    assert not (tmp_path / "r.zarr").exists()
