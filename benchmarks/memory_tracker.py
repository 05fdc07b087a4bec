"""``TensorMemoryTracker``: peak bytes of live tensors allocated by aten ops (a ``TorchDispatchMode``).

A measuring tool, not part of the training API: only ``benchmarks/full_kl_memory.py`` and ``tests/test_full_kl.py``
use it (the tests put ``benchmarks/`` on ``sys.path``), so it lives here rather than in the ``trl_kl`` package.
"""

from __future__ import annotations

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

__all__ = ["TensorMemoryTracker"]


class TensorMemoryTracker(TorchDispatchMode):
    """Records every tensor storage that an aten op allocates while the mode is active (forward *and* backward: the
    autograd engine runs the backward ops under the mode), and the peak of their summed live bytes.

    A storage counts from the op that returns it until it is freed (a ``weakref.finalize`` on the storage, whose
    Python object torch keeps unique). Views and in-place results of tensors that existed before (inputs, weights)
    are not new memory and are not counted. Temporaries *inside* one aten kernel are invisible, so this measures the
    live set of tensors, not the allocator's high-water mark.

    Attributes: ``peak_bytes``, ``current_bytes`` (still live at exit), ``largest_bytes`` and ``largest_op`` (the
    single biggest allocation), ``count``.
    """

    def __init__(self):
        super().__init__()
        self.current_bytes = self.peak_bytes = self.largest_bytes = self.count = 0
        self.largest_op: str | None = None
        self._live: dict[int, int] = {}

    def _free(self, key: int, nbytes: int) -> None:
        if self._live.pop(key, None) is not None:
            self.current_bytes -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {
            a.untyped_storage().data_ptr() for a in tree_flatten((args, kwargs))[0] if isinstance(a, torch.Tensor)
        }
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor):
                continue
            storage = t.untyped_storage()
            key, nbytes = storage.data_ptr(), storage.nbytes()
            if nbytes == 0 or key in self._live or key in inputs:
                continue
            self._live[key] = nbytes
            weakref.finalize(storage, self._free, key, nbytes)
            self.count += 1
            self.current_bytes += nbytes
            self.peak_bytes = max(self.peak_bytes, self.current_bytes)
            if nbytes > self.largest_bytes:
                self.largest_bytes, self.largest_op = nbytes, str(func)
        return out
