"""Is a name given for a model, adapter or data set a local path or a Hugging Face Hub id?

One rule for every input, so `--base gpt2` and `--dataset imdb` are read the same way:
an existing path is local; a name that starts like a path (`.`, `/`, `~`) is local; a name shaped
like a hub id (`name` or `owner/name`: letters, digits, `_`, `.`, `-`) is a hub id; anything else
(two slashes, spaces, a backslash) is a local path that does not exist.
"""

from __future__ import annotations

import re
from pathlib import Path

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def is_local_path(name: str) -> bool:
    """True when `name` means a local file or folder, False when it means a hub id (see module docstring)."""
    if name.startswith((".", "/", "~")) or Path(name).expanduser().exists():
        return True
    return not HUB_ID.match(name)
