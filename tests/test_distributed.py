"""trl_kl.distributed: the end of a multi-process run."""


def test_end_distributed_unwraps_every_ddp_model_then_destroys_the_group(tmp_path):
    """No DDP wrapper of the trainer may keep the process group alive past the end (the gloo crash at exit):
    every wrapper attribute is replaced by its module and freed, then the group is destroyed."""
    import gc
    import weakref
    from types import SimpleNamespace

    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from trl_kl.distributed import end_distributed

    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        policy, critic = torch.nn.Linear(2, 2), torch.nn.Linear(2, 1)
        calls = []
        accelerator = SimpleNamespace(free_memory=lambda: calls.append("free_memory"),
                                      end_training=lambda: calls.append("end_training") or dist.destroy_process_group())
        trainer = SimpleNamespace(model=policy, model_wrapped=DistributedDataParallel(policy),
                                  value_model=DistributedDataParallel(critic), accelerator=accelerator)
        wrappers = [weakref.ref(trainer.model_wrapped), weakref.ref(trainer.value_model)]
        end_distributed(trainer)
        gc.collect()
        assert trainer.model_wrapped is policy and trainer.value_model is critic
        assert all(w() is None for w in wrappers)
        assert calls == ["free_memory", "end_training"] and not dist.is_initialized()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
