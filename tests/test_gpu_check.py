"""benchmarks/gpu_check.py: refuses to run without a GPU, and its CPU mode runs every section.

No GPU is needed: the GPU run itself is a benchmark (benchmarks/README.md), not a test; these
keep the script from breaking between visits to a GPU machine."""
import json
import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"
SECTIONS = ("1 engine vs reference (float64)", "2 engine vs focal, fwd+bwd", "3 training steps", "4 Ray Train")


def run_script(*args: str, env: dict[str, str] | None = None, timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], env={**os.environ, **(env or {})},
                          capture_output=True, text=True, timeout=timeout)


def test_without_a_gpu_it_exits_2_with_one_line():
    result = run_script(env={"CUDA_VISIBLE_DEVICES": ""}, timeout=300)
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.splitlines()[-1] == (
        "gpu_check: no CUDA GPU visible (torch.cuda.is_available() is False); run it on a machine with an NVIDIA GPU")


def test_cpu_small_mode_runs_every_section(tmp_path):
    output = tmp_path / "gpu_check.json"
    result = run_script("--device", "cpu", "--small", "--json", str(output), env={"CUDA_VISIBLE_DEVICES": ""},
                        timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    table = [line for line in result.stdout.splitlines() if line.startswith("| ")]
    for section in SECTIONS:
        assert any(line.startswith(f"| {section} |") for line in table), section
    engine_rows = [line for line in table if line.startswith(f"| {SECTIONS[0]} |")]
    assert len(engine_rows) >= 18 and all(line.endswith("| pass |") for line in engine_rows)
    for loss in ("ap", "alrp", "rs"):  # every ranking loss against its reference
        assert sum(line.startswith(f"| {SECTIONS[0]} | {loss}, ") for line in engine_rows) >= 6, loss
    record = json.loads(output.read_text())
    assert record["passed"] and record["device"] == "cpu" and record["small"]
    assert {row["section"] for row in record["rows"]} == set(SECTIONS)
