"""Which reading of the prompt a cache step belongs to, when a policy scores the prompt by re-reading it.

KVzip's scores come from a second reading of the prompt (``runtime/reread.py``), so the first reading's
attention masses would be thrown away: cache steps skip them (the site attends as usual). The re-read itself
reads every key densely, at a sparse site too, so each token's score is the most attention any re-read query
paid it, not only what a block plan happened to read. The runtime sets the phase around its calls; a cache
step reads it on the host, as it reads ``seen``.
"""
from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar
from typing import Iterator, Literal

Phase = Literal["read", "reread"]
_PHASE: ContextVar[Phase | None] = ContextVar("dynasparse_prompt_phase", default=None)


@contextmanager
def prompt_phase(phase: Phase | None) -> Iterator[None]:
    """Cache steps inside are the prompt's first reading (``"read"``: no masses computed) or its re-read
    (``"reread"``); None leaves them plain steps."""
    token = _PHASE.set(phase)
    try:
        yield
    finally:
        _PHASE.reset(token)


def masses_skipped() -> bool:
    """True while the prompt is first read and a re-read will set every score."""
    return _PHASE.get() == "read"


def rereading() -> bool:
    return _PHASE.get() == "reread"
