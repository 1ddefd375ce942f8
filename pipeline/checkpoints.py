"""Checkpoint files of a run: written atomically, the latest always kept, plus the best K by
validation AP."""
import io
import json
import pickle
import shutil
import warnings
import zipfile
from collections.abc import Sequence
from typing import Any, TypeVar

import torch

from pipeline.errors import DataError
from pipeline.io import write_bytes_atomic, write_json_atomic
from pipeline.storage import PARTIAL_FILES, InputRefused, Location, Where

# A checkpoint of the largest detector here with its optimizer state is under 1 GB, and the
# pickle in it (names, config, classes: the tensors' bytes are records of their own) some 40 KB;
# unpickling, even weights-only, costs about a microsecond per value, so the pickle is bounded.
MAX_CHECKPOINT_BYTES = 4 << 30
MAX_PICKLE_BYTES = 4 << 20
READ_TIMEOUT_S = 900


def save_atomic(state: dict[str, Any], path: Where) -> None:
    """A crash while saving never leaves half a checkpoint (pipeline.io writes, then renames)."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    write_bytes_atomic(buffer.getvalue(), path)


def load(path: Where, device: torch.device | str = "cpu") -> dict[str, Any]:
    """A checkpoint's tensors and plain data. Nothing in the file runs: unpickling is limited to
    tensors, numbers, strings and containers (weights_only), so a file crafted to run code on
    load, as any pickle can, is refused; and the file is read only if it is a regular file of at
    most MAX_CHECKPOINT_BYTES."""
    try:
        data = Location(path).read_bounded(MAX_CHECKPOINT_BYTES, READ_TIMEOUT_S, ("the limit for checkpoints",) * 2)
        _check_records(data)
        with warnings.catch_warnings():  # torch's notes on pickle protocols: the errors say what matters
            warnings.simplefilter("ignore")
            return torch.load(io.BytesIO(data), map_location=device, weights_only=True)
    except InputRefused as refused:
        raise DataError(f"{path}: {refused}") from None
    except pickle.UnpicklingError as error:
        # Never torch's advice, which is to load it with weights_only=False: to run it.
        raise DataError(f"{path}: refused: it holds Python objects other than tensors and plain data "
                        f"({_unsupported(error)}), and checkpoints are loaded without running code") from None
    except (OSError, RuntimeError, EOFError, KeyError) as error:  # KeyError: torch.load of a non-torch file
        raise DataError(f"{path}: not a readable checkpoint ({error!r})") from None


def _check_records(data: bytes) -> None:
    """InputRefused when torch's zip holds a pickle above MAX_PICKLE_BYTES or records that
    unpack to more than MAX_CHECKPOINT_BYTES; what is not a zip is left to torch.load to refuse."""
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            records = archive.infolist()
    except zipfile.BadZipFile:
        raise InputRefused("not a readable checkpoint (not torch.save's zip format, which PyTorch has written "
                           "since 1.6)") from None
    pickled = sum(record.file_size for record in records if record.filename.endswith(".pkl"))
    if pickled > MAX_PICKLE_BYTES:
        raise InputRefused(f"its pickle is {pickled} bytes, above the limit of {MAX_PICKLE_BYTES} (a model's "
                           "names, config and classes take some 40 KB)")
    if sum(record.file_size for record in records) > MAX_CHECKPOINT_BYTES:
        raise InputRefused(f"its records unpack to more than the limit for checkpoints ({MAX_CHECKPOINT_BYTES} bytes)")


def _unsupported(error: pickle.UnpicklingError) -> str:
    """torch's line naming what the file wanted to load, out of its page of advice."""
    lines = [line.strip() for line in str(error).splitlines()]
    named = [line for line in lines if "global" in line.lower() or line.startswith("Unsupported")]
    return named[0].rstrip(".") if named else "an unsupported pickle"


def remove_partials(run_folder: Where) -> None:
    """Removes what a crash or a full disk cut short in a local `run_folder` of checkpoints (an
    object store never shows an object before it is whole): files of an atomic write that were
    never renamed, and checkpoint_* folders without a whole checkpoint in them, as Ray Train's
    in-place upload left them (torch.save's zip ends in its directory: a file cut short has none)."""
    run_folder = Location(run_folder)
    if run_folder.remote or not run_folder.local().is_dir():
        return
    for partial in run_folder.local().rglob(PARTIAL_FILES):
        partial.unlink(missing_ok=True)
    for folder in run_folder.local().glob("checkpoint_*"):
        if folder.is_dir() and not any(zipfile.is_zipfile(state) for state in folder.glob("*.pt")):
            shutil.rmtree(folder, ignore_errors=True)


T = TypeVar("T")


def best(scored: Sequence[tuple[float | None, T]]) -> T | None:
    """The one rule for the checkpoint a run exports: the highest validation AP (the later on a
    tie), or the last one when none was validated."""
    validated = [(score, index) for index, (score, _) in enumerate(scored) if score is not None]
    if validated:
        return scored[max(validated)[1]][1]
    return scored[-1][1] if scored else None


def sound(scored: Sequence[tuple[float | None, T]]) -> T | None:
    """The checkpoint a diverged run can go on from: the one of highest validation AP (a
    validation it passed); None when none was validated. The last one before a divergence may
    hold weights grown without bound while its loss was still finite."""
    validated = [(score, index) for index, (score, _) in enumerate(scored) if score is not None]
    return scored[max(validated)[1]][1] if validated else None


def export_model(state: dict[str, Any], category_ids: list[int], path: Where) -> Location:
    """The trained detector as the run's model.pt: weights, the config it was trained with
    (bound to its prepared data), the class names and their dataset's category ids, from a
    checkpoint's state: the weights validated, which with `train.ema_decay` are the average."""
    weights = {**state["model"], **state["average"]["weights"]} if "average" in state else state["model"]
    save_atomic({"model": weights, "config": state["config"], "classes": state["classes"],
                 "category_ids": category_ids}, path)
    return Location(path)


class CheckpointStore:
    """step-<N>.pt files in `directory` and an index.json of their validation scores; at most
    `keep` of them: the latest (to resume from) and the best `keep - 1` (as Ray Train keeps them)."""

    def __init__(self, directory: Where, keep: int) -> None:
        self.directory = Location(directory)
        self.keep = keep
        self.index_path = self.directory / "index.json"

    def _index(self) -> dict[str, float | None]:
        if not self.index_path.exists():
            return {}
        return json.loads(self.index_path.read_text())

    def save(self, step: int, state: dict[str, Any], score: float | None = None) -> Location:
        path = self.directory / f"step-{step:07d}.pt"
        save_atomic(state, path)
        index = self._index()
        index[path.name] = score
        write_json_atomic(self._prune(index, latest=path.name), self.index_path)
        return path

    def _prune(self, index: dict[str, float | None], latest: str) -> dict[str, float | None]:
        scored = sorted((name for name, score in index.items() if score is not None),
                        key=lambda name: index[name], reverse=True)
        keep = set(scored[:self.keep - 1]) | {latest}
        for name in set(index) - keep:
            (self.directory / name).delete()
        return {name: index[name] for name in index if name in keep}

    def remove_partials(self) -> None:
        """What a crash cut short (`remove_partials`), and checkpoints saved but never indexed."""
        remove_partials(self.directory)
        indexed = self._index()
        for path in self.directory.files("step-*.pt"):
            if path.name not in indexed:
                path.delete()

    def entries(self) -> list[tuple[int, float | None, str]]:
        """(step, validation AP, path) of every checkpoint kept, by step."""
        return [(int(name.removeprefix("step-").removesuffix(".pt")), score, str(self.directory / name))
                for name, score in sorted(self._index().items())]

    def latest(self) -> Location | None:
        names = sorted(self._index())
        return self.directory / names[-1] if names else None

    def best(self) -> Location | None:
        index = self._index()
        return best([(index[name], self.directory / name) for name in sorted(index)])

    def sound(self) -> Location | None:
        index = self._index()
        return sound([(index[name], self.directory / name) for name in sorted(index)])
