"""The fused CPU kernels are built from source on a machine that has none yet, and without a
compiler the engine falls back to its PyTorch path with one warning, computing the same."""
import os
import subprocess
import sys

import pytest

SCRIPT = """
import warnings, torch
from aploss import ap_loss, kernels
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    built = kernels.loaded()
g = torch.Generator().manual_seed(0)
logits = torch.randn(200_000, generator=g, dtype=torch.float64).requires_grad_()
labels = (torch.rand(200_000, generator=g) < 0.01).long()
ap_loss(logits, labels).backward()
torch.save({"built": built, "warnings": [str(w.message) for w in caught], "grad": logits.grad}, OUT)
"""


def run_engine(tmp_path, name, **env):
    out = tmp_path / f"{name}.pt"
    environment = {**os.environ, **env}
    environment.pop("APLOSS_KERNELS", None)
    subprocess.run([sys.executable, "-c", SCRIPT.replace("OUT", repr(str(out)))], env=environment, check=True,
                   timeout=600)
    import torch

    return torch.load(out)


@pytest.mark.skipif(subprocess.run(["which", "c++"], capture_output=True).returncode != 0,
                    reason="no C++ compiler on this machine")
def test_kernels_build_on_a_fresh_machine_and_equal_the_fallback(tmp_path):
    built = run_engine(tmp_path, "built", TORCH_EXTENSIONS_DIR=str(tmp_path / "extensions"))
    assert built["built"] and not built["warnings"]
    assert list((tmp_path / "extensions").glob("aploss_ranking*/*.so"))
    without_compiler = run_engine(tmp_path, "fallback", TORCH_EXTENSIONS_DIR=str(tmp_path / "empty"),
                                  CXX="/nonexistent/c++")
    assert not without_compiler["built"]
    assert len(without_compiler["warnings"]) == 1
    assert "using the pure-PyTorch engine" in without_compiler["warnings"][0]
    assert built["grad"].equal(without_compiler["grad"])
