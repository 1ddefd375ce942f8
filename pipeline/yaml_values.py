"""YAML as configs are written: PyYAML follows YAML 1.1, where `1e-4` is a string, not a number."""
import re
from typing import Any

import yaml


class Loader(yaml.SafeLoader):
    """SafeLoader that also reads exponent numbers without a dot (1e-4, 3E5) as floats."""


Loader.add_implicit_resolver("tag:yaml.org,2002:float", re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+$"),
                             list("-+0123456789."))


def load(text: str) -> Any:
    return yaml.load(text, Loader=Loader)
