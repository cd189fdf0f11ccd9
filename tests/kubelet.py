"""A Secret volume written the way the kubelet writes it (its AtomicWriter).

The kubelet never rewrites a file of a Secret volume in place. Each update:

1. writes every entry into a new directory ``..<timestamp>`` in the volume;
2. makes a symlink ``..data_tmp`` -> that directory, and renames it over
   ``..data`` (rename(2) is atomic: readers see the old or the new set);
3. makes sure each entry exists as a symlink ``<key>`` -> ``..data/<key>``;
4. removes the previous timestamped directory.

So ``<volume>/keys`` keeps its path while its content changes by an atomic
swap, which is what the agent's keys watch must follow::

    vol = SecretVolume(tmp_path / "keys")
    vol.write({"keys": "3+ rfc4106(gcm(aes)) ... 128\\n"})
    vol.path("keys")     # <volume>/keys, what the agent is given
"""

from __future__ import annotations

import itertools
import os
from pathlib import Path
from typing import Mapping

_counter = itertools.count()


class SecretVolume:
    def __init__(self, directory: Path) -> None:
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.updates = 0

    def path(self, key: str) -> Path:
        return self.dir / key

    def write(self, data: Mapping[str, str]) -> None:
        stamp = self.dir / f"..2026_12_04_{os.getpid()}_{next(_counter):06d}"
        stamp.mkdir(mode=0o755)
        for key, value in data.items():
            target = stamp / key
            target.write_text(value)
            target.chmod(0o400)
        data_link = self.dir / "..data"
        old = os.readlink(data_link) if data_link.is_symlink() else None
        tmp = self.dir / "..data_tmp"
        if tmp.is_symlink():
            tmp.unlink()
        tmp.symlink_to(stamp.name)
        os.rename(tmp, data_link)
        for key in data:
            link = self.dir / key
            if not link.is_symlink():
                link.symlink_to(f"..data/{key}")
        if old is not None:
            for f in (self.dir / old).iterdir():
                f.unlink()
            (self.dir / old).rmdir()
        self.updates += 1
