"""Speed and peak memory of the AP-loss engine against the O(P*N) reference and focal loss.

Early-training, detection-shaped input: logits at the prior-bias init (-4.6) plus small
noise, so every negative lies within delta of every positive and nothing is pruned.
All methods run forward + backward in the same process, interleaved, median of repeats.

    python benchmarks/loss_speed.py                     # N in {1M, 8M, 32M}, P in {500, 2000, 4000}
    python benchmarks/loss_speed.py --sizes 1e6 --positives 500 --repeats 3
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torchvision.ops import sigmoid_focal_loss

from aploss import ap_loss
from aploss.reference import reference_ap_loss

# The reference is timed only where it finishes in reasonable time (P * N pair terms).
REFERENCE_MAX_PAIR_TERMS = 1e9


def detection_batch(num_pairs: int, num_pos: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    logits = (-4.6 + 0.05 * torch.randn(num_pairs, generator=g)).to(device)
    labels = torch.zeros(num_pairs, dtype=torch.int8)
    labels[torch.randperm(num_pairs, generator=g)[:num_pos]] = 1
    return logits, labels.to(device)


def engine_step(logits, labels):
    leaf = logits.detach().requires_grad_()
    ap_loss(leaf, labels).backward()
    return leaf.grad


def focal_step(logits, labels, targets):
    leaf = logits.detach().requires_grad_()
    sigmoid_focal_loss(leaf, targets, reduction="sum").backward()
    return leaf.grad


def reference_step(logits, labels):
    return reference_ap_loss(logits, labels)[1]


class PeakMemory:
    """Peak memory above the level at entry: CUDA allocator stats, or the process's peak RSS."""

    def __init__(self, device: str) -> None:
        self.device = device

    def __enter__(self):
        if self.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.start = torch.cuda.memory_allocated()
        else:
            Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
            self.start = self._status_kib("VmRSS") * 1024
        return self

    def __exit__(self, *exc):
        if self.device == "cuda":
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated() - self.start
        else:
            self.peak = self._status_kib("VmHWM") * 1024 - self.start

    @staticmethod
    def _status_kib(field: str) -> int:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
        raise RuntimeError(f"/proc/self/status has no {field}")


def timed(step, device: str) -> float:
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    step()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def steps_for(num_pairs: int, num_pos: int, device: str) -> dict:
    logits, labels = detection_batch(num_pairs, num_pos, device)
    targets = (labels == 1).to(logits.dtype)
    steps = {"engine": lambda: engine_step(logits, labels),
             "focal": lambda: focal_step(logits, labels, targets)}
    if num_pos * num_pairs <= REFERENCE_MAX_PAIR_TERMS:
        steps["reference"] = lambda: reference_step(logits, labels)
    return steps


def measure_time(num_pairs: int, num_pos: int, repeats: int, device: str) -> dict:
    steps = steps_for(num_pairs, num_pos, device)
    times = {name: [] for name in steps}
    for name, step in steps.items():  # warm-up
        seconds = timed(step, device)
        if name == "reference":  # seconds long: one run measures it well enough
            times[name].append(seconds)
    for _ in range(repeats):
        for name, step in steps.items():
            if name != "reference":
                times[name].append(timed(step, device))
    return {f"{name}_ms": 1000 * statistics.median(values) for name, values in times.items()}


def measure_peaks(num_pairs: int, num_pos: int, device: str) -> dict:
    peaks = {}
    for name, step in steps_for(num_pairs, num_pos, device).items():
        if name == "reference":
            continue
        step()  # warm-up: one-time allocations are not the step's
        with PeakMemory(device) as memory:
            step()
        peaks[f"{name}_peak_bytes"] = memory.peak
    return peaks


def peaks_in_child(args: argparse.Namespace) -> dict:
    """Peak memory, measured in a child process whose allocator hands freed blocks back
    (glibc would otherwise keep them, and later steps would show no growth). The timings
    stay in this process: serving every block by mmap would slow them with page faults."""
    if args.device == "cuda":
        return {(n, p): measure_peaks(n, p, "cuda") for n, p in configs(args)}
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
    command = [sys.executable, __file__, "--peaks-only", "--device", "cpu",
               "--sizes", *map(str, args.sizes), "--positives", *map(str, args.positives)]
    output = subprocess.run(command, env=env, check=True, capture_output=True, text=True).stdout
    return {(row["pairs"], row["positives"]): row["peaks"] for row in json.loads(output)}


def configs(args: argparse.Namespace) -> list[tuple[int, int]]:
    return [(n, p) for n in sorted(int(size) for size in args.sizes) for p in sorted(args.positives)]


def markdown(rows: list[dict]) -> str:
    lines = ["| N pairs | P | engine ms | focal ms | engine / focal | reference ms | reference / engine "
             "| engine peak / logits | focal peak / logits |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        ref = r.get("reference_ms")
        ref_text = "n/a" if ref is None else f"{ref:,.0f}{' (extrap.)' if r['reference_extrapolated'] else ''}"
        speedup = "n/a" if ref is None else f"{ref / r['engine_ms']:,.0f}x"
        lines.append(
            f"| {r['pairs']:,} | {r['positives']:,} | {r['engine_ms']:.1f} | {r['focal_ms']:.1f} "
            f"| {r['engine_ms'] / r['focal_ms']:.2f}x | {ref_text} | {speedup} "
            f"| {r['engine_peak_bytes'] / r['logits_bytes']:.2f}x "
            f"| {r['focal_peak_bytes'] / r['logits_bytes']:.2f}x |")
    return "\n".join(lines)


def write_json_atomically(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, suffix=".tmp") as tmp:
        json.dump(payload, tmp, indent=2)
    os.replace(tmp.name, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=float, nargs="+", default=[1e6, 8e6, 32e6])
    parser.add_argument("--positives", type=int, nargs="+", default=[500, 2000, 4000])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", type=Path, default=Path("benchmarks/results/loss_speed.json"))
    parser.add_argument("--peaks-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.peaks_only:
        print(json.dumps([{"pairs": n, "positives": p, "peaks": measure_peaks(n, p, args.device)}
                          for n, p in configs(args)]))
        return

    peaks = peaks_in_child(args)
    rows, reference_rate = [], None
    for num_pairs, num_pos in configs(args):
        row = {"pairs": num_pairs, "positives": num_pos, "logits_bytes": 4 * num_pairs,
               **measure_time(num_pairs, num_pos, args.repeats, args.device), **peaks[num_pairs, num_pos]}
        if "reference_ms" in row:
            row["reference_extrapolated"] = False
            reference_rate = row["reference_ms"] / (num_pos * num_pairs)
        elif reference_rate is not None:
            row["reference_ms"] = reference_rate * num_pos * num_pairs
            row["reference_extrapolated"] = True
        rows.append(row)
        print(f"N={num_pairs:,} P={num_pos:,}: engine {row['engine_ms']:.1f} ms, "
              f"focal {row['focal_ms']:.1f} ms", flush=True)
    table = markdown(rows)
    print()
    print(f"device: {args.device}, torch {torch.__version__}, threads {torch.get_num_threads()}")
    print(table)
    write_json_atomically(args.json, {"device": args.device, "torch": torch.__version__,
                                      "threads": torch.get_num_threads(), "rows": rows})
    print(f"\nwritten: {args.json}")


if __name__ == "__main__":
    main()
