import os
from pathlib import Path

# Where tests find the shipped datasets: $APLOSS_DATA_ROOT (CI sets it), else ../shared/datasets
# beside the project.
DATA_ROOT = Path(os.environ.get("APLOSS_DATA_ROOT") or Path(__file__).resolve().parents[2] / "shared" / "datasets")
