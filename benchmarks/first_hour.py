"""The everyday commands' cost, as a new user meets it: `aploss --help`, `aploss config show`, and
the rerun of a finished `aploss pipeline run` (which prints "skipped (already done)"): wall time
and peak memory of each, median of `--repeats` runs, each in a fresh process.

    .venv/bin/python benchmarks/first_hour.py [--repeats 5] [override ...]

The overrides choose the pipeline run (default: the README's main job, on BCCD); it is run once
first if it has not finished, which takes minutes, and is not timed.
"""
import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

PROJECT = Path(__file__).resolve().parents[1]
COMMAND = [sys.executable, "-m", "pipeline.orchestration.cli"]
# Each timed command runs under this wrapper, which reports its child's wall time and peak RSS.
_MEASURE = ("import json, resource, subprocess, sys, time\n"
            "start = time.perf_counter()\n"
            "done = subprocess.run(sys.argv[1:], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)\n"
            "seconds = time.perf_counter() - start\n"
            "print(json.dumps({'seconds': seconds, 'peak_mb': resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss"
            " / 1024, 'rc': done.returncode, 'out': done.stdout[-2000:]}))")


def measure(arguments: list[str]) -> dict:
    done = subprocess.run([sys.executable, "-c", _MEASURE, *COMMAND, *arguments], capture_output=True, text=True,
                          cwd=PROJECT, check=True)
    result = json.loads(done.stdout)
    if result["rc"] != 0:
        raise SystemExit(f"aploss {' '.join(arguments)} failed:\n{result['out']}")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("overrides", nargs="*")
    options = parser.parse_args()
    pipeline = ["pipeline", "run", *options.overrides]
    first = subprocess.run([*COMMAND, *pipeline], cwd=PROJECT, capture_output=True, text=True)
    if first.returncode != 0:
        raise SystemExit(f"the pipeline run failed:\n{first.stdout[-3000:]}{first.stderr[-3000:]}")
    commands = {"aploss --help": ["--help"], "aploss config show": ["config", "show", *options.overrides],
                "a finished pipeline run, rerun": pipeline}
    print(f"| command | wall s (median of {options.repeats}) | peak RSS MB |")
    print("|---|---:|---:|")
    for name, arguments in commands.items():
        runs = [measure(arguments) for _ in range(options.repeats)]
        if name.startswith("a finished") and "skipped (already done): data-prep, train, evaluate" not in runs[0]["out"]:
            raise SystemExit(f"the rerun did not skip every stage:\n{runs[0]['out']}")
        print(f"| `{name}` | {statistics.median(r['seconds'] for r in runs):.2f} | "
              f"{statistics.median(r['peak_mb'] for r in runs):.0f} |")


if __name__ == "__main__":
    main()
