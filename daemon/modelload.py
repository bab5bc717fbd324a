"""Loading a GGUF file into llama.cpp: the model and a context with the configured parameters.

Every way it can fail becomes a ModelLoadError that tells the operator what to do; llama.cpp's
own notes on the file, logged while it loads, go out at DEBUG (daemon.llamalog).
"""

from __future__ import annotations

import ctypes
from pathlib import Path

from daemon import llamalog
from daemon.llamacpp import lib


class ModelLoadError(Exception):
    """The model file is missing or llama.cpp cannot load it."""


def load_model(
    path: Path,
    *,
    ctx: int,
    batch_tokens: int,
    threads: int,
    threads_batch: int,
    mmap: bool,
    gpu_layers: int,
) -> tuple[lib.llama_model_p, lib.llama_context_p]:
    """The loaded model and its context; the caller frees both."""
    if not path.is_file():
        raise ModelLoadError(f"model file not found: {path}")
    llamalog.install()
    lib.llama_backend_init()
    model_params = lib.llama_model_default_params()
    _assign(
        model_params,
        # A CPU-only build ignores it; a Jetson's CUDA build needs it to use the GPU at all.
        n_gpu_layers=gpu_layers,
        # Read, not mapped: llama.cpp repacks some weights into a faster layout, and with a
        # map their original pages stay resident beside the copy.
        load_mode=lib.LLAMA_LOAD_MODE_MMAP if mmap else lib.LLAMA_LOAD_MODE_NONE,
    )
    with llamalog.model_notes_at_debug():
        model = lib.llama_model_load_from_file(str(path).encode(), model_params)
        if not model:
            raise ModelLoadError(
                f"cannot load model {path}: llama.cpp could not read it "
                "(its log lines just before this one say why)"
            )
        context_params = lib.llama_context_default_params()
        _assign(
            context_params,
            n_ctx=ctx,
            n_batch=batch_tokens,
            n_ubatch=batch_tokens,
            n_threads=threads,
            n_threads_batch=threads_batch,
            flash_attn_type=lib.LLAMA_FLASH_ATTN_TYPE_DISABLED,
        )
        context = lib.llama_init_from_model(model, context_params)
        if not context:
            lib.llama_model_free(model)
            raise ModelLoadError(
                f"cannot load model {path}: llama.cpp could not create a context of "
                f"{ctx} tokens for it"
            )
    return model, context


def _assign(struct: ctypes.Structure, **values: int) -> None:
    """Set fields of a llama.cpp parameter struct, refusing names it does not have: ctypes
    would store an unknown name as a plain attribute that llama.cpp never sees."""
    fields = {field[0] for field in struct._fields_}
    for name, value in values.items():
        if name not in fields:
            raise ModelLoadError(
                f"this llama-cpp-python has no {type(struct).__name__}.{name}; "
                "install the version pyproject.toml asks for"
            )
        setattr(struct, name, value)
