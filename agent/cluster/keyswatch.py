"""The IPsec keys file, as the kubelet keeps it up to date, and the last good copy.

The keys Secret is mounted as a directory. The kubelet never writes a file in
place: it writes a new timestamped directory, points a ``..data_tmp`` symlink
at it and renames that over ``..data`` (one atomic rename); ``keys`` is a
symlink to ``..data/keys``. So the directory is watched, not the file
(inotify on the file would keep watching the old inode), and the file is
read again by path whenever anything in the directory changes::

    keys = KeysFile("/etc/sealnet/keys/keys", on_change=trigger.set, on_error=report)
    keys.load()                   # the first read; None while it is bad or missing
    threading.Thread(target=keys.watch, args=(stop,), daemon=True).start()
    keys.current                  # the last good KeySet

A new file that does not parse, or that changes the ESP overhead (Cilium
refuses that too), is not taken: ``current`` stays the last good keys, so
the datapath stays on them, and ``on_error`` gets one line without key
material (keys.parse never puts key bytes in an error). Watching uses
inotify through watchfiles; where inotify is unavailable it polls once a
second.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from pathlib import Path
from typing import Callable, Optional

from agent.errors import ConfigError
from agent.ipsec import keys as keyfile
from agent.ipsec.keys import KeySet

log = logging.getLogger(__name__)


class KeysFile:
    def __init__(self, path: str | Path, on_change: Callable[[str], None] = lambda reason: None,
                 on_error: Callable[[str], None] = lambda message: None) -> None:
        self.path = Path(path)
        self._on_change, self._on_error = on_change, on_error
        self._lock = threading.Lock()
        self._digest: Optional[bytes] = None
        self._current: Optional[KeySet] = None
        #: monotonic time at which each key ID was first seen in a good file
        self.first_seen: dict[int, float] = {}
        #: the problem with the file on disk, None when it is the one in use
        self.error: Optional[str] = None

    @property
    def current(self) -> Optional[KeySet]:
        with self._lock:
            return self._current

    def load(self) -> Optional[KeySet]:
        """Read the file; take it if it changed and is good. Returns the keys in use."""
        try:
            data = self.path.read_bytes()
        except OSError as e:
            return self._reject(f"keys file {self.path}: cannot read: {e.strerror}", None)
        digest = hashlib.sha256(data).digest()
        with self._lock:
            if digest == self._digest:
                return self._current
            old = self._current
        try:
            new = keyfile.parse(data.decode("utf-8"))
            if old is not None:
                keyfile.check_rotation(old, new)
        except UnicodeDecodeError:
            return self._reject(f"keys file {self.path}: not UTF-8 text", digest)
        except ConfigError as e:
            return self._reject(f"keys file {self.path}: {e}", digest)
        now = time.monotonic()
        with self._lock:
            self._digest, self._current, self.error = digest, new, None
            for key in new:
                self.first_seen.setdefault(key.spi, now)
            for spi in list(self.first_seen):
                if spi not in new:
                    del self.first_seen[spi]
        log.info("keys file loaded path=%s key_ids=%s current=%d", self.path,
                 ",".join(str(k) for k in new.spis), new.current.spi)
        self._on_change("keys")
        return new

    def _reject(self, message: str, digest: Optional[bytes]) -> Optional[KeySet]:
        with self._lock:
            repeated = self.error == message
            self.error = message
            if digest is not None:
                self._digest = digest  # do not re-report the same bad content
            current = self._current
        if not repeated:
            kept = f"keeping key IDs {','.join(map(str, current.spis))}" if current else "no good keys yet"
            log.error("%s; %s", message, kept)
            self._on_error(message)
        return current

    def watch(self, stop: threading.Event) -> None:
        """Reload on every change in the file's directory until ``stop``; falls back to polling."""
        directory = self.path.parent
        try:
            import watchfiles

            # No filter: watchfiles' default one hides dot-files, and the
            # kubelet's swap is all dot-names (..data, ..data_tmp). The
            # timeout re-reads the file every half second anyway, so a change
            # made before the watch was set up is not missed either.
            for _ in watchfiles.watch(directory, watch_filter=None, stop_event=stop, debounce=50, step=20,
                                      recursive=False, raise_interrupt=False, rust_timeout=500,
                                      yield_on_timeout=True):
                self.load()
        except Exception as e:  # noqa: BLE001 - no inotify (limits, odd filesystems): poll instead
            if stop.is_set():
                return
            log.warning("keys file watch via inotify failed (%s); polling every second", e)
            while not stop.wait(1.0):
                self.load()
