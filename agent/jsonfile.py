"""Read a JSON input file, with errors that name the flag, the path and the problem.

    doc = jsonfile.load("--config", path)   # ConfigError: "--config: /x is not JSON: ... at line 3"
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from agent.errors import ConfigError


def load(flag: str, path: str | Path) -> Any:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{flag}: {path} is not UTF-8 text") from None
    except OSError as e:
        raise ConfigError(f"{flag}: cannot read {path}: {e.strerror}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{flag}: {path} is not JSON: {e.msg} at line {e.lineno}") from None
