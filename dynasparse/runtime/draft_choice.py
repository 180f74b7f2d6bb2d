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
(an unmeasured draft step is guessed at its share of the depth, an unmeasured verify pass along the slope
of the measured ones). So on a model whose early blocks do not predict its output, one or
two rounds are lost before it decodes plainly; on one trained for early exit, the shallow drafter that
keeps being accepted wins. Evidence is per round (rows averaged) and older rounds weigh a little less.
A drafter that could beat the current choice were its drafts accepted is probed with one draft
``RETRY_AFTER`` rounds after the last probe; the rest doubles after each rejected probe (quadruples while the
drafter has never had a draft accepted) and starts over after one mostly accepted over the rows, and a probe
whose drafts are all accepted is followed by one twice as long while, at its measured step cost, it still
could beat the choice (an accepted deeper drafter that is slower per token is not run longer). That longer
round, rejected, leaves the rest as it was: the drafter has just won, and at batch 4 one row rejecting a draft
rejects it for the round. So an unlucky round does not rule a good drafter out for long (accepted probes soon
win it back), and drafters that never pay cost a probe ever more rarely. The first timing of each pass kind is
provisional (the next one replaces it rather than averaging with it): under ``torch.compile`` it includes
compiling the graph.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

MARGIN = 1.05  # drafting must be expected this much faster than plain decoding: estimates are noisy
PLAIN_SAMPLES = 2  # the reference is the faster of the last this many plain steps (the first runs cold)
SMOOTHING = 0.3  # weight of a new timing in its running average
DECAY = 0.95  # a drafter's acceptance evidence weighs this much less with each later round of it
RETRY_AFTER = 8  # rounds from one probe to the next; doubles after each rejected probe


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
    accepted: float = 0.0  # drafts the full model agreed with, per round (rows averaged), decayed
    rejected: float = 0.0  # rounds that ended at a rejected draft (rows averaged), decayed
    step_seconds: float | None = None  # one draft step, running average
    last_round: int = -1  # the round it last drafted in

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
    provisional: set = field(init=False, default_factory=set)  # pass kinds timed once: the next replaces it
    plain_seconds: list[float] = field(init=False, default_factory=list)  # every timed plain step
    rounds: dict[str, int] = field(init=False, default_factory=dict)  # "plain" or "blocks 0..i" -> rounds
    last_probe: int = field(init=False, default=0)  # the round of the last probe
    retry_after: int = field(init=False, default=RETRY_AFTER)  # rounds from the last probe to the next
    probing: tuple[int, int] | None = field(init=False, default=None)  # the probe this round runs
    extend: tuple[int, int] | None = field(init=False, default=None)  # a probe that won: try it longer

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
        if self.extend is not None:  # a won probe goes on longer while it could still beat the choice
            block, drafts = self.extend
            if block == choice[0] or self._could_pay(self.drafters[block], plain, best):
                return self._probe(block, min(2 * drafts, self.longest))
        for drafter in self.drafters.values():  # shallow first: the cheapest to try
            if not drafter.tried and self._could_pay(drafter, plain, best):
                return self._probe(drafter.block, 1)
        rivals = [d for d in self.drafters.values() if d.block != choice[0] and self._could_pay(d, plain, best)]
        if rivals and self._round - self.last_probe >= self.retry_after:  # probe the one rested longest
            return self._probe(min(rivals, key=lambda d: d.last_round).block, 1)
        return choice

    def _probe(self, block: int, drafts: int) -> tuple[int, int]:
        self.probing = block, drafts
        return block, drafts

    def record(self, block: int | None, drafts: int, draft_seconds: float, verify_seconds: float,
               accepted: Sequence[int]) -> None:
        """One round's timings and, per row still generating, the drafts it accepted."""
        self.verify_seconds[drafts + 1] = self._timing(("verify", drafts + 1), self.verify_seconds.get(drafts + 1),
                                                       verify_seconds)
        if not drafts:
            self.plain_seconds.append(verify_seconds)
        name = "plain" if block is None else f"blocks 0..{block}"
        self.rounds[name] = self.rounds.get(name, 0) + 1
        probed = self.probing == (block, drafts)
        every_draft_accepted = all(n == drafts for n in accepted)
        won = probed and every_draft_accepted and drafts < self.longest
        self.extend, self.probing = ((block, drafts) if won else None), None
        if probed:  # the rest starts over after a mostly accepted probe (one row of a batch may reject)
            self.last_probe = self._round
            share = sum(accepted) / (drafts * max(len(accepted), 1))
            if share >= 0.5:
                self.retry_after = RETRY_AFTER
            elif drafts == 1:  # a fresh probe rejected (a longer one follows a won probe: the rest stays)
                ever = share > 0 or self.drafters[block].accepted > 0  # a drafter never accepted rests longer
                self.retry_after = (2 if ever else 4) * self.retry_after
        if block is None:
            return
        drafter = self.drafters[block]
        drafter.last_round = self._round
        drafter.step_seconds = self._timing(("draft", block), drafter.step_seconds, draft_seconds / drafts)
        rows = max(len(accepted), 1)
        drafter.accepted = DECAY * drafter.accepted + sum(accepted) / rows
        drafter.rejected = DECAY * drafter.rejected + sum(n < drafts for n in accepted) / rows

    @property
    def _round(self) -> int:
        """Rounds recorded so far."""
        return sum(self.rounds.values())

    def _timing(self, kind: tuple, old: float | None, new: float) -> float:
        """The running average of a pass kind's seconds, its first timing replaced by the second."""
        if old is None:
            self.provisional.add(kind)
            return new
        if kind in self.provisional:
            self.provisional.discard(kind)
            return new
        return _average(old, new)

    def _could_pay(self, drafter: Drafter, plain: float, bar: float) -> bool:
        """Whether some draft length would beat ``bar`` were every draft accepted."""
        return max(self._speedup(drafter, d, 1.0, plain) for d in range(1, self.longest + 1)) > bar

    def _speedup(self, drafter: Drafter, drafts: int, acceptance: float, plain: float) -> float:
        step = drafter.step_seconds
        if step is None:
            step = plain * (drafter.block + 1) / self.depth
        return expected_tokens(acceptance, drafts) * plain / (drafts * step + self._verify(drafts + 1, plain))

    def _verify(self, tokens: int, plain: float) -> float:
        """Seconds of a verify pass over ``tokens``: measured, or extrapolated along the slope between the two
        longest measured passes of several tokens (flat from the longest while only one was measured: a pass of
        two tokens also pays the multi-token path's fixed costs, so the slope from a plain step overstates
        what each further token adds; as cheap as a plain step until a pass of several tokens was measured)."""
        if tokens in self.verify_seconds:
            return self.verify_seconds[tokens]
        several = sorted(n for n in self.verify_seconds if n > 1)
        if not several:
            return plain
        longest = several[-1]
        per_token = 0.0
        if len(several) > 1:
            shorter = several[-2]
            per_token = (self.verify_seconds[longest] - self.verify_seconds[shorter]) / (longest - shorter)
        return self.verify_seconds[longest] + max(per_token, 0.0) * (tokens - longest)
