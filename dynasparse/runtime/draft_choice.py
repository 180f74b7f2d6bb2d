"""Which block drafts, and how many tokens, in each round of self-speculative decoding (DEL's choice).

A round that drafts ``k`` tokens from blocks 0..i costs ``k`` draft steps and one verify pass over ``k + 1``
tokens, and yields ``1 + a + ... + a^k`` tokens on average, ``a`` being the chance that the full model
agrees with a draft whose earlier drafts it accepted. Plain decoding yields one token per single-token
pass. The chooser keeps what was measured (each kind of pass's seconds; per block, the drafts accepted and
the rows whose round ended at a rejected draft) and picks, each round, the block and length with the most
expected tokens per second, or plain decoding when nothing is expected to beat it by ``MARGIN``. The plain
step it compares with is the faster of the last two measured (the first two rounds are plain steps: the
first after the prompt runs cold). Recent, because a plain step's cost changes during a generation: once a
draft round has left rows at different lengths, every later step (plain or verify) takes the cache's
general path, and a reference timed before that would make every draft look dearer than it is.

A block not tried yet is tried with one draft only while it could still pay were every draft accepted
(an unmeasured draft step is guessed at its share of the depth, an unmeasured verify pass at the longest
measured one's cost per extra token). So on a model whose early blocks do not predict its output, one or
two rounds are lost before it decodes plainly; on one trained for early exit, the shallow drafter that
keeps being accepted wins.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

MARGIN = 1.05  # drafting must be expected this much faster than plain decoding: estimates are noisy
PLAIN_SAMPLES = 2  # the reference is the faster of the last this many plain steps (the first runs cold)
SMOOTHING = 0.3  # weight of a new timing in its running average


def default_blocks(depth: int) -> tuple[int, ...]:
    """Blocks ending the drafter when the config names none: after a quarter and half of the depth
    (LayerSkip's and DEL's best exits on 7B-70B models lie there; deeper drafters rarely pay)."""
    return tuple(sorted({min(max(round(depth * share) - 1, 0), depth - 2) for share in (0.25, 0.5)
                         if depth >= 2}))


def _average(old: float | None, new: float) -> float:
    return new if old is None else (1 - SMOOTHING) * old + SMOOTHING * new


def expected_tokens(acceptance: float, drafts: int) -> float:
    """Tokens a round yields on average: the accepted prefix of ``drafts`` plus the full model's own."""
    return sum(acceptance ** j for j in range(drafts + 1))


@dataclass
class Drafter:
    """What was measured of the drafter ending at ``block``."""

    block: int
    accepted: int = 0  # drafts the full model agreed with
    rejected: int = 0  # rows whose round ended at a rejected draft
    step_seconds: float | None = None  # one draft step, running average

    @property
    def tried(self) -> bool:
        return self.accepted + self.rejected > 0

    @property
    def acceptance(self) -> float:
        """Posterior mean of the per-draft acceptance, one success and one failure as the prior."""
        return (self.accepted + 1) / (self.accepted + self.rejected + 2)


@dataclass
class DraftChooser:
    """Chooses ``(block, drafts)`` per round; ``(None, 0)`` is a plain decoding step.

    ``blocks``: the drafters to choose from; ``depth``: the model's number of blocks (to guess an untried
    drafter's step from its share of the depth); ``longest``: the most drafts a round may hold."""

    blocks: Sequence[int]
    depth: int
    longest: int
    drafters: dict[int, Drafter] = field(init=False)
    verify_seconds: dict[int, float] = field(init=False, default_factory=dict)  # tokens read -> seconds
    plain_seconds: list[float] = field(init=False, default_factory=list)  # every timed plain step
    rounds: dict[str, int] = field(init=False, default_factory=dict)  # "plain" or "blocks 0..i" -> rounds

    def __post_init__(self) -> None:
        self.drafters = {block: Drafter(block) for block in sorted(self.blocks)}

    def choose(self) -> tuple[int | None, int]:
        if len(self.plain_seconds) < PLAIN_SAMPLES:  # every estimate is relative to a plain step
            return None, 0
        plain = min(self.plain_seconds[-PLAIN_SAMPLES:])  # recent: the cost changes once rows desync
        best, choice = MARGIN, (None, 0)
        for drafter in self.drafters.values():
            if drafter.tried:
                for drafts in range(1, self.longest + 1):
                    speedup = self._speedup(drafter, drafts, drafter.acceptance, plain)
                    if speedup > best:
                        best, choice = speedup, (drafter.block, drafts)
        for drafter in self.drafters.values():  # shallow first: the cheapest to try
            if not drafter.tried and max(self._speedup(drafter, d, 1.0, plain)
                                         for d in range(1, self.longest + 1)) > best:
                return drafter.block, 1
        return choice

    def record(self, block: int | None, drafts: int, draft_seconds: float, verify_seconds: float,
               accepted: Sequence[int]) -> None:
        """One round's timings and, per row still generating, the drafts it accepted."""
        self.verify_seconds[drafts + 1] = _average(self.verify_seconds.get(drafts + 1), verify_seconds)
        if not drafts:
            self.plain_seconds.append(verify_seconds)
        name = "plain" if block is None else f"blocks 0..{block}"
        self.rounds[name] = self.rounds.get(name, 0) + 1
        if block is None:
            return
        drafter = self.drafters[block]
        drafter.step_seconds = _average(drafter.step_seconds, draft_seconds / drafts)
        drafter.accepted += sum(accepted)
        drafter.rejected += sum(n < drafts for n in accepted)

    def _speedup(self, drafter: Drafter, drafts: int, acceptance: float, plain: float) -> float:
        step = drafter.step_seconds
        if step is None:
            step = plain * (drafter.block + 1) / self.depth
        return expected_tokens(acceptance, drafts) * plain / (drafts * step + self._verify(drafts + 1, plain))

    def _verify(self, tokens: int, plain: float) -> float:
        """Seconds of a verify pass over ``tokens``: measured, or extrapolated from the longest measured pass
        (as cheap as a plain step until a longer one was measured)."""
        if tokens in self.verify_seconds:
            return self.verify_seconds[tokens]
        longest = max(self.verify_seconds)
        per_token = (self.verify_seconds[longest] - plain) / (longest - 1) if longest > 1 else 0.0
        return plain + max(per_token, 0.0) * (tokens - 1)
