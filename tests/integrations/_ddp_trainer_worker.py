"""Worker for tests/integrations/test_hf_parity.py: a Trainer run under DDP (gloo, CPU) with the callback."""

import os
import pathlib


def worker(rank: int, world: int, port: int, tmp: str) -> None:
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank), "LOCAL_RANK": str(rank),
                       "WORLD_SIZE": str(world), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"})
    import torch.distributed as dist
    import transformers

    from datavalue.integrations.hf import DataValueCallback
    from tests.integrations.test_hf_parity import _args, _dataset, _model

    tmp_path = pathlib.Path(tmp)
    args = _args(tmp_path, ddp_backend="gloo", ddp_timeout=180)  # a stuck collective fails instead of hanging
    cb = DataValueCallback(tmp_path / "ddp.zarr", proj_dim=256)
    trainer = transformers.Trainer(model=_model(), args=args, train_dataset=_dataset(),
                                   data_collator=transformers.default_data_collator, callbacks=[cb])
    try:
        trainer.train()
        if rank == 0:
            trainer.save_model(str(tmp_path / "final"))
        dist.barrier()  # both ranks done (rank 0 has written) before either leaves
    except BaseException:
        if dist.is_initialized():
            dist.destroy_process_group()
        raise
    # every file is closed: leave without gloo's C++ teardown, which can abort or hang a rank whose peer has
    # already gone ("terminate called without an active exception"; see tests/capture/_ddp_worker.py)
    os._exit(0)
