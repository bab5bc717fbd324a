"""The LOADING state's work: the model loaded and warmed up, saved conversations taken in.

The engine's settings come from the config's model section; saved conversations are only taken
in by the same model, template and llama.cpp bindings that wrote them.
"""

from __future__ import annotations

import importlib.metadata
import logging
import time
from pathlib import Path

from daemon.config import Config
from daemon.conversations import ConversationStore
from daemon.engine import Engine, EngineSettings
from daemon.framing import Example
from daemon.statefile import Identity, StateFiles, default_dir
from daemon.testhooks import TestHooks
from daemon.turns import Turns

log = logging.getLogger(__name__)


def load_engine(config: Config, model_path: Path, hooks: TestHooks) -> Engine:
    """Load the model at `model_path` with the config's settings, and warm it up."""
    model = config.model
    engine = Engine(
        EngineSettings(
            path=model_path,
            threads=config.threads,
            threads_batch=config.threads_batch,
            ctx=model.ctx,
            max_tokens=model.max_tokens,
            temperature=model.temperature,
            system_prompt=model.system_prompt,
            chat_format=model.chat_format,
            seed=model.seed,
            batch_tokens=model.batch_tokens,
            mmap=model.mmap,
            prompt_style=model.prompt_style,
            examples=tuple(Example(e["question"], e["answer"]) for e in model.examples),
            stop=tuple(model.stop),
            repeat_penalty=model.repeat_penalty,
            gpu_layers=model.gpu_layers,
        ),
        hooks,
    )
    started = time.monotonic()
    warm = engine.warm_up()
    log.info(
        "model warm: %d prompt tokens, warm-up took %d ms",
        warm.prompt_tokens,
        round((time.monotonic() - started) * 1000),
    )
    return engine


def restore_conversations(config: Config, engine: Engine, conversations: ConversationStore) -> None:
    """Take in the conversations saved before a restart (with conversations.persist)."""
    settings = config.conversations
    if settings.persist:
        files = StateFiles(
            default_dir(settings.dir),
            Identity.of(
                model_path=engine.settings.path,
                ctx=engine.settings.ctx,
                template=engine.template_source,
                system_prompt=engine.settings.system_prompt,
                llama=llama_version(),
            ),
        )
        loaded = conversations.load(files)
        log.info("conversations: %d taken in from %s", loaded, files.directory)


def conversation_turns(config: Config, engine: Engine, conversations: ConversationStore) -> Turns:
    """The engine with the conversations' memory, within the configured token budget."""
    settings = config.conversations
    model = config.model
    return Turns(
        engine,
        conversations,
        budget_tokens=settings.max_context_tokens or model.ctx - model.max_tokens,
        keep_state=settings.max_state_mb > 0,
    )


def llama_version() -> str:
    """The llama.cpp bindings' version (a saved model state is only read by the same one)."""
    try:
        return importlib.metadata.version("llama_cpp_python")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"
