"""Speed and peak memory of the engine's losses (AP-loss, aLRP, Rank & Sort) against focal loss,
and of AP-loss against its O(P*N) reference.

Two detection-shaped inputs:
  early  logits at the prior-bias init (-4.6) plus small noise: every negative lies within
         delta of every positive and nothing is pruned;
  late   positives well above the negatives (2 to 6 against -2 +- 1): about 0.1 % of the
         negatives are within delta of the lowest positive.
Each is timed with 1 and 2 threads, on a quiet machine and while other processes keep every
core busy (a training job beside the benchmark). Forward + backward in the same process,
interleaved, median of repeats; ratios are within a run. aLRP and RS rank with a value per
positive (localisation error, target) drawn uniformly from [0, 1].

    python benchmarks/loss_speed.py                     # N in {1M, 8M}, P in {500, 2000}
    python benchmarks/loss_speed.py --sizes 1e6 --positives 500 --repeats 3 --loads quiet
"""
import argparse
import json
import multiprocessing
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torchvision.ops import sigmoid_focal_loss

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from aploss import alrp_loss, ap_loss, kernels, rs_loss  # noqa: E402
from aploss.reference import reference_ap_loss  # noqa: E402

# The reference is timed once, on the smallest early-training input (P * N pair terms).
REFERENCE_MAX_PAIR_TERMS = 1e9


def detection_batch(kind: str, num_pairs: int, num_pos: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    labels = torch.zeros(num_pairs, dtype=torch.int8)
    positive = torch.randperm(num_pairs, generator=g)[:num_pos]
    labels[positive] = 1
    if kind == "early":
        logits = -4.6 + 0.05 * torch.randn(num_pairs, generator=g)
    else:
        logits = -2 + torch.randn(num_pairs, generator=g)
        logits[positive] = 2 + 4 * torch.rand(num_pos, generator=g)
    return logits.to(device), labels.to(device)


LOSSES = ("ap", "alrp", "rs", "focal")


def engine_step(logits, labels):
    leaf = logits.detach().requires_grad_()
    ap_loss(leaf, labels).backward()
    return leaf.grad


def family_step(loss, logits, labels, values):
    """aLRP or RS: the update through the first output, the localisation loss's gradient too."""
    leaf = logits.detach().requires_grad_()
    first, second = loss(leaf, labels, values)
    (first + second).backward()
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


def steps_for(kind: str, num_pairs: int, num_pos: int, device: str) -> dict:
    logits, labels = detection_batch(kind, num_pairs, num_pos, device)
    targets = (labels == 1).to(logits.dtype)
    values = torch.rand(num_pos, generator=torch.Generator().manual_seed(1)).to(device)
    return {"ap": lambda: engine_step(logits, labels),
            "alrp": lambda: family_step(alrp_loss, logits, labels, values.requires_grad_()),
            "rs": lambda: family_step(rs_loss, logits, labels, values.detach()),
            "focal": lambda: focal_step(logits, labels, targets)}


def measure_time(kind: str, num_pairs: int, num_pos: int, repeats: int, device: str) -> dict:
    steps = steps_for(kind, num_pairs, num_pos, device)
    times = {name: [] for name in steps}
    for step in steps.values():  # warm-up
        step()
    for _ in range(repeats):
        for name, step in steps.items():
            times[name].append(timed(step, device))
    return {f"{name}_ms": 1000 * statistics.median(values) for name, values in times.items()}


def measure_reference(num_pairs: int, num_pos: int, device: str) -> dict:
    """The O(P*N) reference and the engine on the same early-training input, one run each."""
    logits, labels = detection_batch("early", num_pairs, num_pos, device)
    engine_step(logits, labels)
    return {"engine_ms": 1000 * timed(lambda: engine_step(logits, labels), device),
            "reference_ms": 1000 * timed(lambda: reference_step(logits, labels), device)}


def measure_peaks(kind: str, num_pairs: int, num_pos: int, device: str, repeats: int = 5) -> dict:
    """Median peak over repeats: on CPU, which pages a step touches first varies by a few hundred
    KB from call to call (per-thread arenas, the order in which blocks are handed back)."""
    peaks = {}
    for name, step in steps_for(kind, num_pairs, num_pos, device).items():
        step()  # warm-up: one-time allocations are not the step's
        values = []
        for _ in range(repeats):
            with PeakMemory(device) as memory:
                step()
            values.append(memory.peak)
        peaks[f"{name}_peak_bytes"] = statistics.median(values)
    return peaks


def peaks_in_child(args: argparse.Namespace) -> dict:
    """Peak memory, measured in a child process whose allocator hands freed blocks back
    (glibc would otherwise keep them, and later steps would show no growth). The timings
    stay in this process: serving every block by mmap would slow them with page faults."""
    if args.device == "cuda":
        return {(kind, n, p): measure_peaks(kind, n, p, "cuda") for kind in args.inputs for n, p in configs(args)}
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
    command = [sys.executable, __file__, "--peaks-only", "--device", "cpu", "--inputs", *args.inputs,
               "--sizes", *map(str, args.sizes), "--positives", *map(str, args.positives)]
    output = subprocess.run(command, env=env, check=True, capture_output=True, text=True).stdout
    return {(row["input"], row["pairs"], row["positives"]): row["peaks"] for row in json.loads(output)}


def configs(args: argparse.Namespace) -> list[tuple[int, int]]:
    return [(n, p) for n in sorted(int(size) for size in args.sizes) for p in sorted(args.positives)]


def _spin() -> None:
    while True:
        pass


class BusyCores:
    """Other processes keeping every core busy while the benchmark runs beside them."""

    def __init__(self, busy: bool) -> None:
        self.busy = busy
        self.processes: list[multiprocessing.Process] = []

    def __enter__(self):
        if self.busy:
            context = multiprocessing.get_context("spawn")
            self.processes = [context.Process(target=_spin, daemon=True) for _ in range(os.cpu_count() or 1)]
            for process in self.processes:
                process.start()
            time.sleep(1.0)
        return self

    def __exit__(self, *exc):
        for process in self.processes:
            process.kill()
            process.join()


def markdown(rows: list[dict]) -> str:
    """Times (ms), each ranking loss's time over focal's, and peak memory over the logits' size."""
    ranking = LOSSES[:-1]
    lines = ["| input | N pairs | P | threads | load | " + " | ".join(f"{name} ms" for name in LOSSES)
             + " | " + " | ".join(f"{name} / focal" for name in ranking)
             + " | " + " | ".join(f"{name} peak" for name in LOSSES) + " |",
             "|---|---:|---:|---:|---|" + "---:|" * (2 * len(LOSSES) + len(ranking))]
    for r in rows:
        lines.append(
            f"| {r['input']} | {r['pairs']:,} | {r['positives']:,} | {r['threads']} | {r['load']} | "
            + " | ".join(f"{r[f'{name}_ms']:.1f}" for name in LOSSES) + " | "
            + " | ".join(f"{r[f'{name}_ms'] / r['focal_ms']:.2f}x" for name in ranking) + " | "
            + " | ".join(f"{r[f'{name}_peak_bytes'] / r['logits_bytes']:.2f}x" for name in LOSSES) + " |")
    return "\n".join(lines)


def write_json_atomically(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, suffix=".tmp") as tmp:
        json.dump(payload, tmp, indent=2)
    os.replace(tmp.name, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--inputs", nargs="+", choices=["early", "late"], default=["early", "late"])
    parser.add_argument("--sizes", type=float, nargs="+", default=[1e6, 8e6])
    parser.add_argument("--positives", type=int, nargs="+", default=[500, 2000])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--loads", nargs="+", choices=["quiet", "busy"], default=["quiet", "busy"])
    parser.add_argument("--repeats", type=int, default=11)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", type=Path, default=Path("benchmarks/results/loss_speed.json"))
    parser.add_argument("--peaks-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.peaks_only:
        print(json.dumps([{"input": kind, "pairs": n, "positives": p, "peaks": measure_peaks(kind, n, p, args.device)}
                          for kind in args.inputs for n, p in configs(args)]))
        return

    fused = args.device == "cpu" and kernels.loaded()
    peaks = peaks_in_child(args)
    rows = []
    for load in args.loads:
        with BusyCores(load == "busy"):
            for kind in args.inputs:
                for num_pairs, num_pos in configs(args):
                    for threads in args.threads:
                        torch.set_num_threads(threads)
                        row = {"input": kind, "pairs": num_pairs, "positives": num_pos, "threads": threads,
                               "load": load, "logits_bytes": 4 * num_pairs,
                               **measure_time(kind, num_pairs, num_pos, args.repeats, args.device),
                               **peaks[kind, num_pairs, num_pos]}
                        rows.append(row)
                        print(f"{kind} N={num_pairs:,} P={num_pos:,} threads={threads} {load}: "
                              + ", ".join(f"{name} {row[f'{name}_ms']:.1f} ms" for name in LOSSES), flush=True)
    num_pairs, num_pos = configs(args)[0]
    reference = None
    if num_pairs * num_pos <= REFERENCE_MAX_PAIR_TERMS:
        torch.set_num_threads(max(args.threads))
        reference = {"pairs": num_pairs, "positives": num_pos, "threads": max(args.threads),
                     **measure_reference(num_pairs, num_pos, args.device)}
    table = markdown(rows)
    print()
    print(f"device: {args.device}, torch {torch.__version__}, fused CPU kernels: {'yes' if fused else 'no'}, "
          f"{os.cpu_count()} cores")
    print(table)
    if reference:
        print(f"\nO(P*N) reference, early input, N={reference['pairs']:,} P={reference['positives']:,}, "
              f"{reference['threads']} threads: {reference['reference_ms']:,.0f} ms, "
              f"{reference['reference_ms'] / reference['engine_ms']:,.0f}x the engine's "
              f"{reference['engine_ms']:.1f} ms")
    write_json_atomically(args.json, {"device": args.device, "torch": torch.__version__, "fused_kernels": fused,
                                      "cores": os.cpu_count(), "rows": rows, "reference": reference})
    print(f"\nwritten: {args.json}")


if __name__ == "__main__":
    main()
