"""The small C++ kernels dynasparse builds for CPU, once per machine (PyTorch caches the build under
``~/.cache/torch_extensions``). Where one cannot build (no compiler, no ninja), its torch path runs instead."""
from __future__ import annotations

import functools
import warnings
from pathlib import Path

import torch

_CAPABILITY_FLAGS = {  # let ATen's vector type use the instructions PyTorch itself picked on this CPU
    "AVX512": ["-DCPU_CAPABILITY=AVX512", "-DCPU_CAPABILITY_AVX512", "-mavx512f", "-mavx512bw", "-mavx512vl",
               "-mavx512dq", "-mfma"],
    "AVX2": ["-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2", "-mavx2", "-mfma"],
}


@functools.cache
def built(name: str, source: Path, fallback: str) -> bool:
    """True once the kernels of ``source`` are registered as ``torch.ops.<name>``; False (with a warning that
    ``fallback`` runs instead) where they cannot build here."""
    from torch.utils import cpp_extension

    flags = _CAPABILITY_FLAGS.get(torch.backends.cpu.get_cpu_capability(), [])
    try:
        cpp_extension.load(name=name, sources=[str(source)], is_python_module=False,
                           extra_cflags=["-O3", "-fopenmp", *flags], extra_ldflags=["-fopenmp"])
    except Exception as error:  # the torch path is exact too, only slower
        warnings.warn(f"{fallback} runs on CPU: the C++ kernel {source.name} did not build ({error})")
        return False
    return True
