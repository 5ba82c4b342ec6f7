"""The on-disk tuning cache: one JSON file per device and software environment.

Each entry holds one backend's measurement for one key together with the hash of that
backend's source, so a changed or new backend re-times only itself (Triton's disk cache hashes
the whole candidate list, and adding one config re-tunes everything). Writes merge under a file
lock and land with ``os.replace``, so concurrent processes lose no entries and a reader never sees
half a file. Damage of any kind costs one warning and a rebuild, never an exception.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import tempfile
import warnings
from pathlib import Path

import filelock

log = logging.getLogger("mishops")

FORMAT_VERSION = 1
LOCK_TIMEOUT_S = 30.0


def cache_dir() -> Path:
    """``MISHOPS_CACHE_DIR``, else the user's cache directory (XDG on Linux)."""
    explicit = os.environ.get("MISHOPS_CACHE_DIR")
    if explicit:
        return Path(explicit).expanduser()
    import platformdirs

    return Path(platformdirs.user_cache_dir("mishops"))


def build_root() -> Path:
    """Where compiled extensions live: ``MISHOPS_BUILD_DIR``, else ``build`` in :func:`cache_dir`.
    Apart from the tuning cache because a build outlives any tuning (it depends on the toolchain,
    not the GPU's timings) and takes a minute: a fresh tuning cache need not cost a rebuild."""
    explicit = os.environ.get("MISHOPS_BUILD_DIR")
    return Path(explicit).expanduser() if explicit else cache_dir() / "build"


def environment(device: str) -> dict[str, str]:
    """What makes a timing valid: the device and every library version that runs kernels."""
    import torch

    env = {"format": str(FORMAT_VERSION), "device": device, "torch": torch.__version__,
           "cuda": str(torch.version.cuda)}
    for package in ("triton", "cupy"):  # the installed versions, without importing either (a third of a second)
        env[package] = _installed_version(package)
    return env


def _installed_version(package: str) -> str:
    import importlib.metadata

    names = ("cupy", "cupy-cuda13x", "cupy-cuda12x", "cupy-cuda11x") if package == "cupy" else (package,)
    for name in names:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return "absent"


def cache_file(env: dict[str, str]) -> Path:
    slug = re.sub(r"[^A-Za-z0-9]+", "-", env["device"]).strip("-").lower()[:60]
    digest = hashlib.sha256(json.dumps(env, sort_keys=True).encode()).hexdigest()[:12]
    return cache_dir() / f"tuning-{slug}-{digest}.json"


class DiskCache:
    """Measurements for one environment: ``{key: {backend: measurement}}``."""

    def __init__(self, env: dict[str, str]):
        self.env = env
        self.path = cache_file(env)
        self._warned: set[str] = set()

    def _warn_once(self, what: str, message: str) -> None:
        if what not in self._warned:
            self._warned.add(what)
            warnings.warn(f"mishops: {message}", RuntimeWarning, stacklevel=3)

    def _read_unlocked(self) -> dict[str, dict]:
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return {}
        except OSError as exc:
            self._warn_once("io", f"cannot read tuning cache {self.path}: {exc}; tuning in memory only")
            return {}
        try:
            doc = json.loads(raw)
            if not isinstance(doc, dict) or not isinstance(doc.get("entries"), dict):
                raise ValueError("no 'entries' table")
            if doc.get("environment") != self.env:
                raise ValueError("written for another environment or format version")
            return doc["entries"]
        except (ValueError, UnicodeDecodeError) as exc:
            self._warn_once("corrupt", f"ignoring damaged tuning cache {self.path} ({exc}); it will be rebuilt")
            return {}

    def read(self) -> dict[str, dict]:
        return self._read_unlocked()

    @contextlib.contextmanager
    def _locked(self):
        lock = filelock.FileLock(str(self.path) + ".lock", timeout=LOCK_TIMEOUT_S)
        with lock:
            yield

    def update(self, key: str, measurements: dict[str, dict]) -> bool:
        """Merge ``measurements`` into ``key``; False (with one warning) when the disk refuses."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self._locked():
                entries = self._read_unlocked()
                entries.setdefault(key, {}).update(measurements)
                doc = {"environment": self.env, "entries": entries}
                fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=self.path.name, suffix=".tmp")
                try:
                    with os.fdopen(fd, "w") as f:
                        json.dump(doc, f, indent=1, sort_keys=True)
                        f.flush()
                        os.fsync(f.fileno())
                    os.replace(tmp, self.path)
                except BaseException:
                    with contextlib.suppress(OSError):
                        os.unlink(tmp)
                    raise
            return True
        except (OSError, filelock.Timeout) as exc:
            self._warn_once("io", f"cannot write tuning cache in {self.path.parent}: {exc}; "
                                     "choices are kept in memory for this process only")
            return False


def all_cache_files() -> list[Path]:
    return sorted(cache_dir().glob("tuning-*.json"))


def clear() -> list[Path]:
    removed = []
    for path in all_cache_files():
        for p in (path, Path(str(path) + ".lock")):
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
                removed.append(p)
    return removed
