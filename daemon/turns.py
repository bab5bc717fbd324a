"""The generator the scheduler drives: a plain question goes to the engine as it is; a turn of a
conversation gets its earlier turns, cut to the token budget, and their saved model state.

Turns of one conversation are answered in arrival order because the scheduler runs one job at
a time from a FIFO queue: a turn reads its history when it starts, after every earlier turn of
its conversation has ended.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence

from daemon.conversations import ConversationStore, Exchange
from daemon.engine import Engine
from daemon.generation import Generation
from daemon.grammar import AnswerFormat
from daemon.seqstate import SavedState


class Turns:
    """Questions and conversation turns, on one engine (implements scheduler.Generator)."""

    def __init__(
        self, engine: Engine, store: ConversationStore, *, budget_tokens: int, keep_state: bool
    ) -> None:
        """`budget_tokens`: the most tokens a turn's whole prompt may have (history included);
        `keep_state`: save each turn's model state for the next one (conversations.max_state_mb
        above 0)."""
        self._engine = engine
        self._store = store
        self._budget_tokens = budget_tokens
        self._keep_state = keep_state

    def generate(
        self,
        question: str,
        *,
        max_tokens: int | None,
        temperature: float | None,
        on_text: Callable[[str], None],
        should_stop: Callable[[], bool],
        stop: Sequence[str] = (),
        answer_format: AnswerFormat | None = None,
        conversation_id: str | None = None,
    ) -> Generation:
        engine = self._engine
        answer = functools.partial(
            engine.generate,
            question,
            max_tokens=max_tokens,
            temperature=temperature,
            on_text=on_text,
            should_stop=should_stop,
            stop=stop,
            answer_format=answer_format,
        )
        if conversation_id is None:
            return answer()
        start = self._store.begin(conversation_id)
        exchange: Exchange | None = None
        dropped = 0
        state: SavedState | None = None
        try:
            prompt, dropped = self.fit(question, start.exchanges)
            history = start.exchanges[dropped:]
            context_tokens = len(prompt) - len(engine.prompt_tokens(question)) if history else 0
            result = answer(history=history, resume=start.state, prompt=prompt)
            if not result.stopped:  # docs/protocol.md: only answers that end stop or length
                exchange = (question, result.text)
                if self._keep_state:
                    state = engine.save_sequence(engine.history_tokens((*history, exchange)))
        finally:
            self._store.finish(start, exchange, dropped=dropped, state=state)
        info = start.info(context_tokens=context_tokens, dropped_now=dropped)
        return dataclasses.replace(result, conversation=info)

    def fit(self, question: str, exchanges: Sequence[Exchange]) -> tuple[list[int], int]:
        """The prompt with as many of the latest turns as fit the budget, and how many of the
        oldest were left out. The system prompt and the question always stay."""
        prompt = self._engine.prompt_tokens(question, exchanges)
        if len(prompt) <= self._budget_tokens or not exchanges:
            return prompt, 0
        # Fewer turns never make a longer prompt: find the fewest to drop by halving.
        low, high = 1, len(exchanges)  # dropping `high` fits (no turns left), `low - 1` does not
        best = self._engine.prompt_tokens(question)
        while low < high:
            middle = (low + high) // 2
            candidate = self._engine.prompt_tokens(question, exchanges[middle:])
            if len(candidate) <= self._budget_tokens:
                high, best = middle, candidate
            else:
                low = middle + 1
        return best, high
