"""The engine's fused CPU kernels (csrc/ranking.cpp), as `torch.ops.aploss.*`.

Compiled on first use with this machine's C++ compiler through torch's extension builder
(ninja), into torch's extension cache, where every later process (and every Ray worker on the
node) finds it; torch rebuilds it when the source or torch changes. Where no compiler is
found the engine keeps its pure-PyTorch path, which computes the same numbers; the warning
says why. `APLOSS_KERNELS=0` chooses that path without trying.
"""
import functools
import logging
import os
import warnings
from pathlib import Path

SOURCE = Path(__file__).with_name("csrc") / "ranking.cpp"


@functools.cache
def loaded() -> bool:
    """Whether the fused kernels are registered (building them the first time)."""
    if os.environ.get("APLOSS_KERNELS", "1") == "0":
        return False
    # Importing the builder warns, on a CUDA build of torch without a GPU, about CUDA_HOME, which
    # these CPU kernels never use.
    builder_log = logging.getLogger("torch.utils.cpp_extension")
    level = builder_log.level
    builder_log.setLevel(logging.ERROR)
    try:
        from torch.utils.cpp_extension import load

        load(name="aploss_ranking", sources=[str(SOURCE)], extra_cflags=["-O3", "-ffp-contract=off"],
             is_python_module=False)
    except Exception as error:  # noqa: BLE001 - any build failure leaves the PyTorch path, said once
        warnings.warn(f"aploss: fused CPU kernels unavailable, using the pure-PyTorch engine: {error}", stacklevel=2)
        return False
    finally:
        builder_log.setLevel(level)
    return True
