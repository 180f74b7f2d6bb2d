"""The per-round choice of self-speculative decoding: a cost model over measured timings and acceptance."""
import pytest

from dynasparse.runtime.draft_choice import RETRY_AFTER, DraftChooser, default_blocks, expected_tokens


@pytest.mark.parametrize("depth, blocks", [(1, ()), (2, (0,)), (3, (0, 1)), (4, (0, 1)), (30, (7, 14))])
def test_default_drafters_end_at_a_quarter_and_half_of_the_depth(depth, blocks):
    assert default_blocks(depth) == blocks


def test_expected_tokens_is_the_accepted_prefix_plus_one():
    assert expected_tokens(0.0, 4) == 1.0
    assert expected_tokens(1.0, 4) == 5.0
    assert expected_tokens(0.5, 2) == pytest.approx(1.75)


def _chooser(verify_per_token: float, acceptance: float, rounds: int = 30) -> DraftChooser:
    """Simulated rounds: a plain step takes 1 s, a draft step its share of 4 blocks, a verify pass of n
    tokens 1 + verify_per_token * (n - 1) s; each of 4 rows accepts a deterministic share of drafts."""
    chooser = DraftChooser((0, 1), depth=4, longest=6)
    for _ in range(rounds):
        block, k = chooser.choose()
        if block is None:
            chooser.record(None, 0, 0.0, 1.0, [0] * 4)
            continue
        accepted = [min(k, int(acceptance * 10 + row) // 10 * k) for row in range(4)]
        chooser.record(block, k, k * (block + 1) / 4, 1 + verify_per_token * k, accepted)
    return chooser


def test_plain_decoding_when_drafts_are_rejected():
    chooser = _chooser(verify_per_token=0.1, acceptance=0.0)
    assert chooser.choose() == (None, 0)
    assert chooser.rounds["plain"] >= 26  # one try per drafter, a probe after a rest that doubles, then plain


def test_probes_of_a_drafter_that_never_pays_grow_rare():
    """Each probe of a drafter never accepted quadruples the rest before the next: in 200 rounds, the two
    drafters' first tries and one probe 32 rounds later (the next would come 128 rounds after that)."""
    chooser = _chooser(verify_per_token=0.1, acceptance=0.0, rounds=200)
    assert sum(n for name, n in chooser.rounds.items() if name != "plain") <= 3


def test_an_unlucky_first_round_does_not_rule_a_good_drafter_out():
    chooser = DraftChooser((0,), depth=4, longest=6)
    for round_ in range(60):
        block, k = chooser.choose()
        if block is None:
            chooser.record(None, 0, 0.0, 1.0, [0] * 4)
        else:  # the first round's drafts are all rejected, every later one accepted
            chooser.record(block, k, k * 0.25, 1 + 0.05 * k, [0 if round_ < 3 else k] * 4)
    assert chooser.choose()[0] == 0
    assert chooser.rounds["blocks 0..0"] >= 20


def test_a_good_drafter_rejected_once_is_probed_again_soon():
    """A rejected round early on (the start of a generation is harder to draft) sends the chooser back to
    plain steps. The rejected round is the won probe's longer follow-up, so the rest is not doubled: the next
    probe comes RETRY_AFTER rounds later, and most of 40 rounds draft."""
    chooser = DraftChooser((0,), depth=4, longest=8)
    for round_ in range(40):
        block, k = chooser.choose()
        if block is None:
            chooser.record(None, 0, 0.0, 1.0, [0] * 4)
        else:  # the second draft round is rejected, every other one accepted
            chooser.record(block, k, k * 0.4, 1.4 + 0.08 * k, [0 if round_ == 3 else k] * 4)
    assert chooser.rounds["plain"] <= 2 + RETRY_AFTER
    assert chooser.rounds["blocks 0..0"] >= 20
    assert chooser.choose()[0] == 0


def test_plain_decoding_when_verifying_costs_a_step_per_token():
    """A verify pass as dear as that many plain steps (compute-bound): no drafter can pay, even accepted."""
    chooser = _chooser(verify_per_token=1.0, acceptance=1.0)
    assert chooser.choose() == (None, 0)
    assert sum(n for name, n in chooser.rounds.items() if name != "plain") <= 4  # a try and a probe per drafter


def test_the_shallow_drafter_that_is_accepted_wins_with_long_drafts():
    chooser = _chooser(verify_per_token=0.05, acceptance=1.0)
    block, k = chooser.choose()
    assert block == 0 and k >= 4
    assert chooser.rounds["blocks 0..0"] >= 25


def test_a_drafter_pays_again_once_plain_steps_slow_down():
    """Rows left at different lengths by a draft round make every later step dearer (the cache's general
    path): compared with the plain steps measured before that, drafting would look dearer than it is."""
    chooser = DraftChooser((0,), depth=4, longest=6)
    desynced = False
    for _ in range(30):
        block, k = chooser.choose()
        step = 1.4 if desynced else 1.0
        if block is None:
            chooser.record(None, 0, 0.0, step, [0] * 4)
            continue
        chooser.record(block, k, k * 0.35, 1.4 + 0.1 * k, [k] * 4)
        desynced = True
    assert chooser.choose()[0] == 0
    assert chooser.rounds["blocks 0..0"] >= 20


def test_a_cheaper_drafter_unlucky_at_first_takes_over_from_a_dearer_one():
    """Block 0's first round is rejected, block 1's accepted: the chooser drafts from block 1 until a probe
    of block 0 is accepted, then from block 0, which costs half as much per draft."""
    chooser = DraftChooser((0, 1), depth=4, longest=6)
    tried_block_0 = False
    for _ in range(120):
        block, k = chooser.choose()
        if block is None:
            chooser.record(None, 0, 0.0, 1.0, [0] * 4)
            continue
        accepted = 0 if block == 0 and not tried_block_0 else k
        tried_block_0 = tried_block_0 or block == 0
        chooser.record(block, k, k * (block + 1) / 4, 1 + 0.05 * k, [accepted] * 4)
    assert chooser.choose()[0] == 0
    assert chooser.rounds["blocks 0..0"] > chooser.rounds["blocks 0..1"]


def test_an_accepted_probe_of_a_slower_drafter_is_not_run_longer():
    """Block 0 drafts two tokens a round that are accepted; blocks 0..1 are guessed cheap enough to probe. The
    probe's draft is accepted, but at its measured step cost (0.8 of a plain step) it cannot beat block 0:
    it is not followed by rounds twice as long, so it costs one round, not a cascade of four."""
    chooser = DraftChooser((0, 1), depth=8, longest=8)
    for _ in range(40):
        block, k = chooser.choose()
        if block is None:
            chooser.record(None, 0, 0.0, 1.0, [0])
        else:
            step, accepted = (0.12, min(k, 2)) if block == 0 else (0.8, k)
            chooser.record(block, k, k * step, 1.2 + 0.05 * k, [accepted])
    assert chooser.rounds["blocks 0..1"] == 1
    assert chooser.rounds["blocks 0..0"] >= 35


def test_a_probe_one_row_of_four_rejects_is_followed_soon():
    """At batch 4 the first probe is accepted by three rows of four: the drafts mostly pay, so the rest
    before the next probe starts over at RETRY_AFTER instead of doubling, and most rounds draft."""
    chooser = DraftChooser((0,), depth=4, longest=8)
    first = True
    for _ in range(40):
        block, k = chooser.choose()
        if block is None:
            chooser.record(None, 0, 0.0, 1.0, [0] * 4)
        else:
            chooser.record(block, k, k * 0.4, 1.4 + 0.08 * k, [k, k, k, 0] if first else [k] * 4)
            first = False
    assert chooser.rounds["plain"] <= 2 + RETRY_AFTER + 1
