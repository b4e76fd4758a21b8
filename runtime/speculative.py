"""Speculative decoding in three verbs: the draft proposes, the main model scores, the acceptance rule commits.

The draft is a draft model (ModelDraft) or the sequence itself (LookupDraft: prompt lookup, no model run).
Main-only decoding is the same loop with no proposals: the main model scores one position per call, or, greedy,
takes MAIN_ONLY_STEPS of its own steps per call, as if it had proposed them and kept them all.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field, replace
from typing import Iterator

import numpy as np

from runtime.decoder import BatchKvCache, TokenLedger
from runtime.prompt_lookup import MAX_NGRAM, MIN_NGRAM, PromptLookup
from runtime.sampling import SamplingParams, distribution, draw, one_hot

# The most proposals a step verifies: a verify of that many is still a step, whose positions the main model scores
# exactly as its decode steps would (runtime/kernels/attention.c's STEP_TOKENS, 33 positions a row).
MAX_DRAFT_LENGTH = 32
# Main-only greedy decoding takes this many steps per main call after its first (TokenLedger.greedy_chain): where
# the model chains them in one call (moecc.FusedDecoder), each is the decode step it would be alone, without the
# round trip through Python and ONNX Runtime between two; small-coder's main-only generations took 0.92x the time
# with 8 or 32 per call. 8 keeps a stream's pieces close together (about 6 ms apart there). The first step stays
# one token, so the first token comes no later.
MAIN_ONLY_STEPS = 8


@dataclass
class Proposal:
    tokens: list[int]
    probs: list[np.ndarray]  # q_i: the draft distribution each token was drawn from, [V] each; none when greedy
    # Copied in place of the draft model's proposals (LookupThenDraft): its step tells the draft model's length
    # policy nothing.
    instead_of_draft: bool = False

    def cut(self, limit: int) -> Proposal:
        """At most `limit` tokens: a lookup copies its own number of tokens, which must fit the step's room too."""
        return self if len(self.tokens) <= limit else replace(self, tokens=self.tokens[:limit], probs=self.probs[:limit])


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    new_tokens: int = 0
    seconds: float = 0.0  # prefill included
    prefill_seconds: float = 0.0
    first_token_seconds: float = 0.0
    draft_seconds: float = 0.0
    verify_seconds: float = 0.0
    verify_calls: int = 0
    proposed: int = 0
    accepted: int = 0
    draft_lengths: list[int] = field(default_factory=list)

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / self.seconds if self.seconds else 0.0

    @property
    def decode_tokens_per_second(self) -> float:
        """New tokens over the time after the prompt was read."""
        decoding = self.seconds - self.prefill_seconds
        return self.new_tokens / decoding if decoding > 0 else 0.0

    @property
    def prefill_tokens_per_second(self) -> float:
        return self.prompt_tokens / self.prefill_seconds if self.prefill_seconds else 0.0

    @property
    def acceptance_rate(self) -> float:
        """Share of proposed draft tokens that the main model accepted."""
        return self.accepted / self.proposed if self.proposed else 0.0

    @property
    def mean_accepted_length(self) -> float:
        """Tokens committed per main-model call (accepted draft tokens plus the main model's own; main-only greedy
        decoding, its steps per call: MAIN_ONLY_STEPS)."""
        return self.new_tokens / self.verify_calls if self.verify_calls else 0.0

    def as_dict(self) -> dict:
        return {
            "prompt_tokens": self.prompt_tokens,
            "new_tokens": self.new_tokens,
            "seconds": round(self.seconds, 4),
            "prefill_seconds": round(self.prefill_seconds, 4),
            "first_token_seconds": round(self.first_token_seconds, 4),
            "tokens_per_second": round(self.tokens_per_second, 2),
            "prefill_tokens_per_second": round(self.prefill_tokens_per_second, 2),
            "decode_tokens_per_second": round(self.decode_tokens_per_second, 2),
            "draft_seconds": round(self.draft_seconds, 4),
            "verify_seconds": round(self.verify_seconds, 4),
            "verify_calls": self.verify_calls,
            "proposed": self.proposed,
            "accepted": self.accepted,
            "acceptance_rate": round(self.acceptance_rate, 4),
            "mean_accepted_length": round(self.mean_accepted_length, 3),
            "mean_draft_length": round(sum(self.draft_lengths) / len(self.draft_lengths), 3) if self.draft_lengths else 0.0,
        }


class FixedDraftLength:
    """The same number of proposals every step."""

    def __init__(self, length: int):
        self.length = length

    @property
    def max_length(self) -> int:
        return self.length

    def choose(self) -> int:
        return self.length

    def update(self, length: int, kept: int, draft_seconds: float, verify_seconds: float, draft_backlog: int = 1, step: int = 0, alone_before: int = 0) -> None:
        pass  # nothing to learn


class AdaptiveDraftLength:
    """The draft length, per step, that maximizes expected committed tokens per second (of lengths near the best,
    the longest: _pick).

    k proposals commit E(k) = 1 + s(1) + ... + s(k) tokens in one main call, at the cost of the draft's k
    proposals and one verify call over k + 1 positions; s(i), the chance that the first i proposals are
    all accepted, is the product of each position's rate of acceptance among the steps that reached it,
    each shrunk toward the rate before it (POSITION_PRIOR steps' worth; the first toward the rate over all
    proposals). A text's hard tokens come in runs, so proposals that got as far as i are likelier to be
    accepted than the average one, and a single rate a (E(k) = (1 - a^(k+1)) / (1 - a)) undervalues long
    drafts: on small-coder's held-out text E(8) is 5.00 where a single rate says 4.68, and in
    scripts/speculation_ceiling.py's replay with a draft that chains its proposals, auto drafted 6.4
    tokens per step instead of 3.0 and ran 1.11x as fast, level with the best fixed length (with one draft
    call per proposal, as fast as with a single rate).

    Both costs are measured per length, not assumed: on an MoE a longer verify touches more experts, and a
    draft that chains its greedy proposals in one call (moecc.FusedDecoder) pays for a step's first
    proposal several times what it pays for each further one (small-coder: about 0.21 and 0.06 main-model
    calls), where a cost per proposal would make long drafts look dear. Rates and costs are measured as
    generation runs, with decay so they follow the text. A verify length never measured is assumed as
    cheap as the nearest measured one below it: it gets tried, then judged by its own cost; each timed
    measure lowers a shorter length's dearer figure (_keep_ordered). A number of proposals never measured is
    priced between the measured ones, or beyond them at the nearest one's cost per proposal.

    k = 0 (main model alone) is a candidate; while it wins, a probe keeps the acceptance estimate current: after
    PROBE_EVERY idle steps, then twice as long after each probe that leaves the main model alone the better
    choice (a probe costs the draft's catch-up on every token since its last call), back to PROBE_EVERY once a
    probe makes speculation pay. A probe runs the best length but 0, not 1: one proposal is the length that pays
    least, and judged by it alone, a spell of hard text on small-coder kept the main model alone for hundreds of
    steps while the probes backed off. A probe is PROBE_STEPS speculative steps, and so are a policy's first
    steps: one step's outcome barely moves an estimate resting on several, so one-step probes rarely overturned
    a poor one, and backed off each time. With a few unlucky first steps, small-coder's main model then ran
    alone for whole 128-token generations after 512- and 1,536-token prompts, at 0.96x main-only, where k = 4
    made 1.28x. While speculation wins, every REFRESH_EVERY steps the draft sits out
    until the main model's cost alone has been timed (at most MAX_REFRESH_STEPS steps), so that cost stays
    measured too: it is what speculation is judged against. After a refresh that finds speculation ahead by
    REFRESH_MARGIN or more the interval doubles, up to MAX_REFRESH_INTERVAL, and after one that does not it
    returns to REFRESH_EVERY: a lead that large does not turn on a drift of the main model's cost alone, while a
    refresh every 32 steps kept small-coder's main model alone for 9 % of its steps
    (scripts/speculation_ceiling.py --replay). The main model alone is timed only after SETTLE_STEPS main-alone
    steps in a row of the same sequence: right after draft calls the main model runs up to a third slower (the
    draft's weights took its place in cache), which decoding without the draft never pays; timed there, the main
    model alone looks slower than it is and speculation wins where it loses. Every EXPLORE_EVERY speculative
    steps the length next to the best (one longer, then one shorter) runs instead: a length's cost is measured
    only when it runs, so without it a figure taken in a slow moment would keep its length out for good
    (small-coder in scripts/bench_vs_transformers.py: auto averaged 2.3 tokens per verify at 1.25x main-only
    where k = 5 made 1.54x). Near the best the rates are flat, so a step next to it costs little. A sample more
    than OUTLIER times its figure (a call slowed down by something else on the machine) is bounded and counts as
    one step's: on small-coder, one such sample at a short length raised every longer length through the
    ordering and, with a few rejections, switched speculation off for hundreds of steps. The first WARMUP_STEPS
    of a generation update the acceptance but not the costs: right after a prompt, calls run slower while the
    weights return to cache, and those times would mislead every later generation (a cost not measured otherwise
    takes a warm-up time until the first later one replaces it).

    A Generator keeps one policy for all its generations, so what one learned the next starts from; a lock
    keeps concurrent generations from tearing its state (their interleaving only changes speed, never the
    committed tokens' distribution).
    """

    DECAY = 0.9
    POSITION_DECAY = 0.95  # each position's rate is measured on fewer steps than the overall one: a longer memory
    POSITION_PRIOR = 4.0
    PROBE_EVERY = 16
    PROBE_STEPS = 4
    MAX_PROBE_INTERVAL = 1024
    REFRESH_EVERY = 32
    REFRESH_MARGIN = 1.25  # speculation's rate over the main model's alone beyond which refreshes back off
    MAX_REFRESH_INTERVAL = 512
    MAX_REFRESH_STEPS = 8  # room for SETTLE_STEPS + 1 in a row in each of a few generations sharing the policy
    SETTLE_STEPS = 2
    WARMUP_STEPS = 4
    EXPLORE_EVERY = 8
    STALE_STEPS = 8
    OUTLIER = 2.0  # a timed sample above this many times its figure counts as an outlier (_measured)
    LONGER_WITHIN = 0.03  # _pick: how far below the best rate a longer length may be and still be chosen

    def __init__(self, max_length: int):
        self.max_length = max_length
        self.accepted = 0.0  # decayed count of accepted proposals
        self.rejected = 0.0  # decayed count of steps that ended with a rejection
        self.reached = [0.0] * (max_length + 1)  # by position i (1-based): decayed count of steps that proposed it after i - 1 accepted
        self.kept_at = [0.0] * (max_length + 1)  # ... and of those that had it accepted
        self.draft_cost: dict[int, float] = {}  # proposals -> seconds the draft takes for them
        self._draft_line: list[float] | None = None  # _draft_costs() until draft_cost changes: it changes only on speculative steps
        self.verify_cost: dict[int, float] = {}  # positions verified -> seconds per call
        self.idle_steps = 0
        self.busy_steps = 0
        self.refresh_left = 0  # main-alone steps this refresh may still take
        self.refresh_interval = self.REFRESH_EVERY
        self._provisional: set[int | tuple[str, int]] = set()  # costs (verify positions, ("draft", proposals)) measured only in warm-up steps
        self._steps = 0  # steps reported so far
        self._sampled: dict[int | tuple[str, int], int] = {}  # each figure's last sample, in self._steps
        self.probe_interval = self.PROBE_EVERY
        self.probe_left = self.PROBE_STEPS  # speculative steps the running probe still takes: the first steps are one
        self._explore_longer = False  # the direction of the next step next to the best
        self._lock = threading.Lock()

    @property
    def acceptance(self) -> float:
        return (self.accepted + 1) / (self.accepted + self.rejected + 2)  # Laplace prior: 0.5 before any step

    def _verify_costs(self) -> list[float]:
        """Seconds per verify call over 1 .. max_length + 1 positions: a number of positions never measured
        costs what the nearest measured one below it does (the fewest measured, if none is below)."""
        cost, costs = self.verify_cost[min(self.verify_cost)], []
        for positions in range(1, self.max_length + 2):
            cost = self.verify_cost.get(positions, cost)
            costs.append(cost)
        return costs

    def _draft_costs(self) -> list[float]:
        """Seconds of a step's 0 .. max_length proposals: a number never measured lies on the line between the
        nearest measured ones, or beyond the measured ones, costs the nearest's per proposal. Kept until a step
        measures the draft again: rebuilt every step, it took 14 of rates()' 21 microseconds, while the main
        model alone on tiny-coder takes a few hundred per step and the policy chooses it at every one."""
        if self._draft_line is None:
            self._draft_line = self._draft_line_now()
        return self._draft_line

    def _draft_line_now(self) -> list[float]:
        figures, measured, costs = self.draft_cost, sorted(self.draft_cost), [0.0]
        for length in range(1, self.max_length + 1):
            if length in figures:  # every length once a policy has run a while: the search below took 12 µs a step
                costs.append(figures[length])
                continue
            below = next((other for other in reversed(measured) if other <= length), None)
            above = next((other for other in measured if other >= length), None)
            if below is not None and above is not None and below != above:
                share = (length - below) / (above - below)
                costs.append((1 - share) * self.draft_cost[below] + share * self.draft_cost[above])
            else:
                nearest = below if below is not None else above
                costs.append(self.draft_cost[nearest] * length / nearest)
        return costs

    def rates(self) -> list[float]:
        """Expected committed tokens per second of every length 0..max_length, in one pass: the choice runs
        every step, where a millisecond-long model call leaves no room for tens of microseconds of Python."""
        rate, survival = self.acceptance, 1.0
        rates, committed = [], 1.0  # committed = E(k) = 1 + s(1) + ... + s(k)
        for length, (draft, verify) in enumerate(zip(self._draft_costs(), self._verify_costs())):
            rates.append(committed / (draft + verify))
            if length < self.max_length:
                position = length + 1
                rate = (self.kept_at[position] + self.POSITION_PRIOR * rate) / (self.reached[position] + self.POSITION_PRIOR)
                survival *= min(rate, 0.999)
                committed += survival
        return rates

    def _best(self) -> int:
        return self._pick(self.rates())

    def _pick(self, rates: list[float]) -> int:
        """The length to run: the main model alone where it has the best rate, else the longest length whose rate
        is within LONGER_WITHIN of the best. Near the best the rates are flat and their estimates noisy, and a longer
        draft's shortfall is the smaller risk: it commits more tokens per verify, and its costs stay measured. On
        small-coder (live A/B, two Generators alternating, 4 runs of 5 rounds over 8 held-out prompts) auto's mean
        length went from 6.0-6.3 to 7.1-7.6 and its speed per prompt from 0.93-0.98x to 0.96-1.00x k = 8's."""
        best = rates.index(max(rates))
        if best == 0:
            return 0
        return max(length for length in range(best, len(rates)) if rates[length] >= (1 - self.LONGER_WITHIN) * rates[best])

    def choose(self) -> int:
        with self._lock:
            return self._choose()

    def _choose(self) -> int:
        if not self.draft_cost or not self.verify_cost:
            return self.max_length  # nothing measured yet: measure the draft and a long verify first
        if self.refresh_left:
            self.refresh_left -= 1
            return 0
        rates = self.rates()
        best = self._pick(rates)
        if best == 0:
            if not self.probe_left:
                self.idle_steps += 1
                if self.idle_steps >= self.probe_interval:
                    self.idle_steps, self.probe_left = 0, self.PROBE_STEPS
            if self.probe_left:
                return rates.index(max(rates[1:]), 1)  # the length speculation would run at
        else:
            self.busy_steps += 1
            if self.busy_steps >= self.refresh_interval:
                self.busy_steps, self.refresh_left = 0, self.MAX_REFRESH_STEPS - 1
                return 0
            if self.busy_steps % self.EXPLORE_EVERY == 0:
                self._explore_longer = not self._explore_longer
                longer = best == 1 or (self._explore_longer and best < self.max_length)
                return best + 1 if longer else best - 1
        return best

    def update(
        self, length: int, kept: int, draft_seconds: float, verify_seconds: float, draft_backlog: int = 1, step: int = WARMUP_STEPS,
        alone_before: int = SETTLE_STEPS,
    ) -> None:
        """One step's outcome; draft_backlog is how many tokens the draft had to read before proposing, step the
        step's index in its generation, alone_before how many main-alone steps of the same sequence came right
        before it."""
        with self._lock:
            self._update(length, kept, draft_seconds, verify_seconds, draft_backlog, step >= self.WARMUP_STEPS, alone_before)

    def _measured(self, key: int | tuple[str, int], previous: float | None, sample: float, timed: bool) -> float:
        """The decayed average of timed samples; a warm-up sample stands in only until the first timed one. The
        old figure decays once per step since its last sample, up to STALE_STEPS: a length run only now and then
        (explored, or the main model alone) moves more than half way to its new sample, one run every step a tenth."""
        if previous is None or key in self._provisional:
            (self._provisional.discard if timed else self._provisional.add)(key)
            self._sampled[key] = self._steps
            return sample
        if not timed:
            return previous
        self._sampled[key], since = self._steps, self._steps - self._sampled[key]
        if sample > previous * self.OUTLIER:
            # A call the OS set aside, or a burst of a neighbour's traffic (a call is never slowed down to less than
            # its cost, so only slow samples are suspect): bounded, and weighed as one step's sample whatever its
            # age, so that it cannot drag its length (and, through _keep_ordered, every longer one) far enough to
            # switch speculation off. A lasting slowdown still raises the figure step by step.
            sample, since = previous * self.OUTLIER, 1
        kept = self.DECAY ** min(since, self.STALE_STEPS)
        return kept * previous + (1 - kept) * sample

    def _update(self, length: int, kept: int, draft_seconds: float, verify_seconds: float, draft_backlog: int, timed: bool, alone_before: int) -> None:
        self._steps += 1
        if length == 0:
            self.probe_left = 0  # a probe cut to nothing (a generation's last token) ends, judging nothing
            settled = timed and alone_before >= self.SETTLE_STEPS
            self.verify_cost[1] = self._measured(1, self.verify_cost.get(1), verify_seconds, settled)
            if settled and self.refresh_left:  # the main model alone is measured: back to speculation
                self.refresh_left = 0
                rates = self.rates()
                clear = max(rates[1:]) >= self.REFRESH_MARGIN * rates[0]
                self.refresh_interval = min(2 * self.refresh_interval, self.MAX_REFRESH_INTERVAL) if clear else self.REFRESH_EVERY
            return
        self.verify_cost[length + 1] = self._measured(length + 1, self.verify_cost.get(length + 1), verify_seconds, timed)
        if timed:  # a warm-up figure stands in for its own length only
            self._keep_ordered(self.verify_cost, length + 1, lowest=2)
        # After idle steps the draft first reads every token since (a backlog of 1 or 2 is the usual step): not
        # what its proposals cost.
        if draft_backlog <= 2:
            self.draft_cost[length] = self._measured(("draft", length), self.draft_cost.get(length), draft_seconds, timed)
            if timed:
                self._keep_ordered(self.draft_cost, length, lowest=1)
            self._draft_line = None
        self.accepted = self.DECAY * self.accepted + kept
        self.rejected = self.DECAY * self.rejected + (kept < length)
        for position in range(1, min(length, kept + 1) + 1):  # the proposals reached: all accepted, or up to the first rejected
            self.reached[position] = self.POSITION_DECAY * self.reached[position] + 1
            self.kept_at[position] = self.POSITION_DECAY * self.kept_at[position] + (position <= kept)
        if self.probe_left:
            self.probe_left -= 1
            if not self.probe_left:
                still_idle = self._best() == 0
                self.probe_interval = min(2 * self.probe_interval, self.MAX_PROBE_INTERVAL) if still_idle else self.PROBE_EVERY

    @staticmethod
    def _keep_ordered(figures: dict[int, float], length: int, lowest: int) -> None:
        """More positions verified, or more proposals, cost at least what fewer do: the figure just measured
        lowers every shorter length's above it. Otherwise a length last timed in a slow moment (a warm-up step,
        a noisy neighbour) would look too costly to be chosen again and its figure would never be corrected
        (the shipped pair with the INT4 draft: 5 positions stuck at 6.3 ms while 8 measured 3.4, so auto kept
        k = 2). A longer length's cheaper figure is left as it is: it gets chosen, so measured again. Raising
        it too kept every longer length above a noisy sample of a shorter one, where only exploring now and
        then could lower it again; in scripts/speculation_ceiling.py's replay with calls scattered by 10 %,
        leaving them, with proposals priced by their number, grew auto's drafts from 3.9 to 4.9 proposals
        and its speed 1.06x. Lengths below `lowest` are left alone: the main model alone (1 position
        verified) is the refresh's to time, settled."""
        cost = figures[length]
        for other, figure in figures.items():
            if lowest <= other < length and figure > cost:
                figures[other] = cost


DraftLengthPolicy = FixedDraftLength | AdaptiveDraftLength


def _propose_one(proposal: Proposal, logits: np.ndarray, params: SamplingParams, rng: np.random.Generator) -> int:
    """Draw the next proposed token from the draft's logits and record it (with its distribution when sampling)."""
    if params.greedy:
        token = int(logits.argmax())
    else:
        probs = distribution(logits, params)
        token = draw(probs, rng)
        proposal.probs.append(probs)
    proposal.tokens.append(token)
    return token


def propose(draft: TokenLedger, unread: list[int], length: int, params: SamplingParams, rng: np.random.Generator) -> Proposal:
    """Draw `length` tokens from the draft after it reads `unread` (the sequence's tokens it does not hold, at
    least the last): one draft call each, or greedy ones chained in as few as the draft can."""
    if params.greedy:
        return Proposal(draft.greedy_chain(unread, length), [])
    proposal = Proposal([], [])
    logits = draft.feed(unread, last=1)[-1]
    for position in range(length):
        token = _propose_one(proposal, logits, params, rng)
        if position + 1 < length:
            logits = draft.feed([token])[-1]
    return proposal


def propose_batch(draft: BatchKvCache, unread: dict[int, list[int]], lengths: dict[int, int], params: SamplingParams, rngs: list[np.random.Generator]) -> dict[int, Proposal]:
    """Draw lengths[row] tokens for each listed row after it reads unread[row], one batched draft call per position."""
    logits = {row: last[-1] for row, last in draft.feed(unread, last=dict.fromkeys(unread, 1)).items()}
    proposals = {row: Proposal([], []) for row in lengths}
    for position in range(max(lengths.values())):
        drawn = {}
        for row, length in lengths.items():
            if position < length:
                token = _propose_one(proposals[row], logits[row], params, rngs[row])
                if position + 1 < length:
                    drawn[row] = [token]
        logits |= {row: last[-1] for row, last in draft.feed(drawn).items()}
    return proposals


def score_batch(main: BatchKvCache, unread: dict[int, list[int]], proposals: dict[int, Proposal]) -> dict[int, np.ndarray]:
    """score() for several rows: every row's unread tokens and proposals in one batched main call."""
    blocks = {row: unread[row] + proposal.tokens for row, proposal in proposals.items()}
    return main.feed(blocks, last={row: len(proposal.tokens) + 1 for row, proposal in proposals.items()})


def score(main: TokenLedger, unread: list[int], proposal: Proposal) -> np.ndarray:
    """The main model's logits [k+1, V] after it reads `unread` (at least the sequence's last token, whose
    logits score the first proposal) and at each proposed token, in one call."""
    return main.feed(unread + proposal.tokens, last=len(proposal.tokens) + 1)


def score_greedy(main: TokenLedger, unread: list[int], proposal: Proposal) -> list[int]:
    """score()'s positions' argmaxes alone, all a greedy judge reads."""
    return main.greedy_tokens(unread + proposal.tokens, last=len(proposal.tokens) + 1)


class ModelDraft:
    """Proposals drawn from a draft model's logits; its cache first reads the sequence's tokens it lacks."""

    def __init__(self, cache: TokenLedger):
        self.cache = cache

    def prefill(self, prompt: list[int]) -> None:
        _prefill(self.cache, prompt)

    def backlog(self, tokens: list[int]) -> int:
        """Tokens of the sequence the draft must read before its first proposal (1 after a proposing step)."""
        return len(tokens) - len(self.cache)

    def propose(self, tokens: list[int], length: int, params: SamplingParams, rng: np.random.Generator) -> Proposal:
        return propose(self.cache, unread_tokens(self.cache.ids, tokens), length, params, rng)

    def keep(self, length: int) -> None:
        self.cache.keep(length)


class LookupDraft:
    """Proposals copied from the sequence itself (PromptLookup): no model call, and none where nothing
    matches. A copied token is certain, so the distribution it was drawn from is one-hot, and speculative
    sampling keeps it with the main model's probability of it."""

    def __init__(self, vocab_size: int, min_ngram: int = MIN_NGRAM):
        self.lookup = PromptLookup(min_ngram=min_ngram)
        self.vocab_size = vocab_size

    def prefill(self, prompt: list[int]) -> None:
        self.lookup.index(prompt)

    def backlog(self, tokens: list[int]) -> int:
        return 1  # nothing to read: every proposal costs what a lookup costs

    def propose(self, tokens: list[int], length: int, params: SamplingParams, rng: np.random.Generator) -> Proposal:
        copied = self.lookup.propose(tokens, length)
        return Proposal(copied, [] if params.greedy else [one_hot(token, self.vocab_size) for token in copied])

    def keep(self, length: int) -> None:
        pass  # no cache


class LookupThenDraft:
    """The sequence's own continuation where its last MAX_NGRAM tokens occurred before (up to `lookup_length`
    copied tokens, for no model call), else the draft model's proposals. Where code repeats itself a 3-token
    match is repeated text often enough that copying it beats the draft: with k = 4 for the draft, small-coder
    committed 3.98 tokens per verify against the draft alone's 3.59 and ran 1.70-1.97x main-only against
    1.56-1.67x over 16 held-out 128-token windows; on 8 prompts that each start a function it ran level with
    the draft alone (scripts/bench_vs_transformers.py). A shorter match (2 tokens) is wrong too often to
    displace the draft (1.65x against 1.63x)."""

    def __init__(self, cache: TokenLedger, vocab_size: int, lookup_length: int):
        self.model = ModelDraft(cache)
        self.lookup = LookupDraft(vocab_size, min_ngram=MAX_NGRAM)
        self.lookup_length = lookup_length

    def prefill(self, prompt: list[int]) -> None:
        self.model.prefill(prompt)
        self.lookup.prefill(prompt)

    def backlog(self, tokens: list[int]) -> int:
        return self.model.backlog(tokens)

    def propose(self, tokens: list[int], length: int, params: SamplingParams, rng: np.random.Generator) -> Proposal:
        copied = self.lookup.propose(tokens, self.lookup_length, params, rng)
        return replace(copied, instead_of_draft=True) if copied.tokens else self.model.propose(tokens, length, params, rng)

    def keep(self, length: int) -> None:
        self.model.keep(length)


Draft = ModelDraft | LookupDraft | LookupThenDraft


class BatchModelDraft:
    """ModelDraft for the rows of a batch: one batched draft call per proposed position."""

    def __init__(self, cache: BatchKvCache):
        self.cache = cache

    def prefill(self, prompts: list[list[int]]) -> None:
        self.cache.prefill(prompts)  # each row's first call reads its prompt's last token again, for its logits (unread_tokens)

    def backlog(self, row: int, tokens: list[int]) -> int:
        return len(tokens) - len(self.cache.ids[row])

    def propose(self, histories: list[list[int]], lengths: dict[int, int], params: SamplingParams, rngs: list[np.random.Generator]) -> dict[int, Proposal]:
        catch_up = {row: unread_tokens(self.cache.ids[row], histories[row]) for row in lengths}
        return propose_batch(self.cache, catch_up, lengths, params, rngs)

    def keep(self, row: int, length: int) -> None:
        self.cache.keep(row, length)


class BatchLookupDraft:
    """LookupDraft for the rows of a batch, each row looking up its own sequence."""

    def __init__(self, vocab_size: int, rows: int):
        self.rows = [LookupDraft(vocab_size) for _ in range(rows)]

    def prefill(self, prompts: list[list[int]]) -> None:
        for lookup, prompt in zip(self.rows, prompts):
            lookup.prefill(prompt)

    def backlog(self, row: int, tokens: list[int]) -> int:
        return 1

    def propose(self, histories: list[list[int]], lengths: dict[int, int], params: SamplingParams, rngs: list[np.random.Generator]) -> dict[int, Proposal]:
        return {row: self.rows[row].propose(histories[row], length, params, rngs[row]) for row, length in lengths.items()}

    def keep(self, row: int, length: int) -> None:
        pass


class BatchLookupThenDraft:
    """LookupThenDraft for the rows of a batch: the rows whose sequence repeats itself copy, the others go
    through the draft model in one batched call per proposed position."""

    def __init__(self, cache: BatchKvCache, vocab_size: int, rows: int, lookup_length: int):
        self.model = BatchModelDraft(cache)
        self.lookups = [LookupDraft(vocab_size, min_ngram=MAX_NGRAM) for _ in range(rows)]
        self.lookup_length = lookup_length

    def prefill(self, prompts: list[list[int]]) -> None:
        self.model.prefill(prompts)
        for lookup, prompt in zip(self.lookups, prompts):
            lookup.prefill(prompt)

    def backlog(self, row: int, tokens: list[int]) -> int:
        return self.model.backlog(row, tokens)

    def propose(self, histories: list[list[int]], lengths: dict[int, int], params: SamplingParams, rngs: list[np.random.Generator]) -> dict[int, Proposal]:
        copied = {row: self.lookups[row].propose(histories[row], self.lookup_length, params, rngs[row]) for row in lengths}
        drafted = {row: length for row, length in lengths.items() if not copied[row].tokens}
        found = {row: replace(proposal, instead_of_draft=True) for row, proposal in copied.items() if proposal.tokens}
        return found | (self.model.propose(histories, drafted, params, rngs) if drafted else {})

    def keep(self, row: int, length: int) -> None:
        self.model.keep(row, length)


BatchDraft = BatchModelDraft | BatchLookupDraft | BatchLookupThenDraft


def accept(proposal: Proposal, target: list[np.ndarray], rng: np.random.Generator) -> tuple[int, int]:
    """How many proposed tokens to keep, and the main model's next token after them.

    Speculative sampling: keep draft token x_i with probability min(1, p_i(x_i) / q_i(x_i)); at the
    first rejection draw the replacement from norm(max(0, p_i - q_i)); if all k are kept, draw a bonus
    token from p_{k+1}. Every committed token is then distributed exactly as under p alone. With the
    one-hot distributions of greedy decoding this is "keep while the argmaxes agree, then take the
    main model's argmax", so greedy output equals the main model's own greedy output.
    """
    if len(proposal.probs) != len(proposal.tokens):
        raise ValueError("accept() needs the draft distribution of every proposed token; greedy proposals go through judge()")
    for i, (token, q) in enumerate(zip(proposal.tokens, proposal.probs)):
        p = target[i]
        if rng.random() < min(1.0, p[token] / q[token]):
            continue
        residual = np.maximum(p - q, 0.0)
        return i, draw(residual / residual.sum(), rng)
    return len(proposal.tokens), draw(target[-1], rng)


def judge(proposal: Proposal, logits: np.ndarray, params: SamplingParams, rng: np.random.Generator) -> tuple[int, int]:
    """accept() on the main model's logits [k+1, V]. Greedy takes the rule's one-hot case directly (keep while
    the argmaxes agree, then the main model's argmax) without building a distribution over the vocabulary for
    every position."""
    if params.greedy:
        return agree(proposal.tokens, logits.argmax(axis=-1).tolist())  # Python ints: compared without a numpy call each
    return accept(proposal, [distribution(row, params) for row in logits], rng)


def agree(proposed: list[int], best: list[int]) -> tuple[int, int]:
    """Greedy acceptance on the main model's argmax at each verified position: keep the proposals while they
    agree with it, then take its argmax."""
    kept = 0
    for token, main_token in zip(proposed, best):
        if token != main_token:
            break
        kept += 1
    return kept, best[kept]


def agreed_length(length_before: int, kept: int, committed: int) -> int:
    """How much of a cache that read a step's proposals agrees with the sequence after the step, which had
    `length_before` tokens and gained `committed` (its `kept` accepted proposals first), short of its last token.

    The decoding loops roll every cache that read proposals back to at most this after each step (the rejected
    proposals go), so a cache always holds a prefix of the sequence, and the next call reads the tail beyond it
    (unread_tokens) without comparing the sequences token by token, which would cost a step more as the context grows."""
    return length_before + min(kept, committed - 1)


def unread_tokens(cached: list[int], sequence: list[int]) -> list[int]:
    """The tokens of `sequence` after those a cache holds (`cached`, a prefix of it), at least its last one: a
    cache holding all of it (a prompt's prefill) is cut back by one, since the next call needs that token's logits."""
    del cached[len(sequence) - 1 :]
    return sequence[len(cached) :]


def _commit(proposal: Proposal, kept: int, next_token: int, stop_tokens: set[int], room: int) -> tuple[list[int], bool]:
    """The tokens a step commits, cut after a stop token and at `room`; and whether a stop token ended them."""
    new = proposal.tokens[:kept] + [next_token]
    stop_at = None if stop_tokens.isdisjoint(new) else next(i for i, token in enumerate(new) if token in stop_tokens)
    if stop_at is not None:
        new = new[: stop_at + 1]
    return new[:room], stop_at is not None and stop_at < room


def _prefill(cache: TokenLedger, prompt: list[int]) -> None:
    """Every prompt token but the last into the cache; the last is scored by the first step."""
    unread = cache.sync(prompt[:-1])
    if unread:
        cache.feed(unread, last=1)  # no logit of the prompt is read here: one row, the fewest a call returns


def decode(
    main: TokenLedger,
    draft: Draft | None,
    prompt: list[int],
    max_new_tokens: int,
    draft_length: DraftLengthPolicy,
    params: SamplingParams,
    stop_tokens: set[int],
    stats: GenerationStats,
) -> Iterator[list[int]]:
    """Yield the committed tokens of each step until a stop token, max_new_tokens or a full cache."""
    rng = np.random.default_rng(params.seed)
    tokens = list(prompt)
    stats.prompt_tokens = len(prompt)
    started = time.perf_counter()
    # The draft reads the prompt first. Right after the main model's prefill, small-coder's draft took 1.7-1.9 ms
    # rather than 0.3-0.4 to read a prompt of about 70 tokens in most generations that followed a main-only one
    # (waiting, not working: its thread's CPU time stayed 0.3-0.5 ms); read first, it takes its 0.4-0.7 ms, and a
    # speculative generation of 128 tokens took 0.90-0.97x as long (8 held-out prompts in turn with main-only
    # generations, a 2-core Xeon; speculative generations alone: 0.97-1.00x).
    if draft is not None:
        draft.prefill(prompt)
    _prefill(main, prompt)
    stats.prefill_seconds = time.perf_counter() - started
    alone = 0  # main-alone steps in a row right before this one
    chained = draft is None and params.greedy  # main-only greedy: MAIN_ONLY_STEPS a call
    while stats.new_tokens < max_new_tokens:
        room = main.capacity - len(tokens)  # the main cache must hold the unread token and the proposals
        if room < 0:
            break
        limit = min(max_new_tokens - stats.new_tokens - 1, room)
        length = min(draft_length.choose(), limit) if draft is not None else 0
        backlog = draft.backlog(tokens) if length > 0 else 0  # every cache holds a prefix of tokens (agreed_length)
        tick = time.perf_counter()
        proposal = draft.propose(tokens, length, params, rng).cut(limit) if length > 0 else Proposal([], [])
        length = len(proposal.tokens)  # a lookup may find fewer, or none: then the main model runs alone
        tock = time.perf_counter()
        if chained:  # the main model's own greedy steps, as if proposed and all kept
            steps = min(MAIN_ONLY_STEPS, limit + 1) if stats.new_tokens else 1
            *own, next_token = main.greedy_chain(unread_tokens(main.ids, tokens), steps)
            proposal, kept = Proposal(own, []), len(own)
        elif params.greedy:
            kept, next_token = agree(proposal.tokens, score_greedy(main, unread_tokens(main.ids, tokens), proposal))
        else:
            kept, next_token = judge(proposal, score(main, unread_tokens(main.ids, tokens), proposal), params, rng)
        verified = time.perf_counter()
        if not (chained or proposal.instead_of_draft):  # main-only decoding's calls are not the policy's to judge
            draft_length.update(length, kept, tock - tick, verified - tock, backlog, stats.verify_calls, alone)
        alone = alone + 1 if length == 0 else 0
        stats.draft_seconds += tock - tick
        stats.verify_seconds += verified - tock
        stats.verify_calls += 1
        stats.proposed += length
        stats.accepted += 0 if chained else kept  # the main model's own steps accept no proposal
        stats.draft_lengths.append(length)
        new, stopped = _commit(proposal, kept, next_token, stop_tokens, max_new_tokens - stats.new_tokens)
        agreed = agreed_length(len(tokens), kept, len(new))
        main.keep(agreed)
        if length > 0:
            draft.keep(agreed)  # nothing to drop where it is shorter (a draft that never read its last proposal)
        if stats.new_tokens == 0:
            stats.first_token_seconds = time.perf_counter() - started
        tokens.extend(new)
        stats.new_tokens += len(new)
        stats.seconds = time.perf_counter() - started
        yield new
        if stopped:
            break


def decode_batch(
    main: BatchKvCache,
    draft: BatchDraft | None,
    prompts: list[list[int]],
    max_new_tokens: int,
    draft_length: DraftLengthPolicy,
    params: SamplingParams,
    rngs: list[np.random.Generator],
    stop_tokens: set[int],
    stats: GenerationStats,
) -> list[list[int]]:
    """decode() for several sequences, each to its own stop: the draft proposes for every row (a draft model
    in one batched call per proposed position, a lookup in each row's own sequence) and the main model
    verifies every row's proposals in one batched call (see BatchKvCache); each row commits by the same
    acceptance rule, with its own random generator. Without a draft every step is one main call for all
    rows, one token each."""
    started = time.perf_counter()
    stats.prompt_tokens = sum(len(prompt) for prompt in prompts)
    if draft is not None:
        draft.prefill(prompts)  # first, as in decode()
    main.prefill(prompts)  # each row's first call reads its prompt's last token again, for its logits (unread_tokens)
    stats.prefill_seconds = time.perf_counter() - started
    histories = [list(prompt) for prompt in prompts]
    outputs: list[list[int]] = [[] for _ in prompts]
    active = set(range(len(prompts)))
    alone = [0] * len(prompts)  # each row's main-alone steps in a row right before this one
    step = 0  # of this batch, for the policy's warm-up
    while active:
        chosen = draft_length.choose() if draft is not None else 0
        limits = {row: max_new_tokens - len(outputs[row]) - 1 for row in sorted(active)}  # the most a row's step may propose
        lengths = {row: min(chosen, limit) for row, limit in limits.items()}
        proposing = {row: length for row, length in lengths.items() if length > 0}
        # Every row's caches hold a prefix of its history (agreed_length): what they have not read is its tail.
        backlogs = {row: draft.backlog(row, histories[row]) for row in proposing}
        tick = time.perf_counter()
        proposals = draft.propose(histories, proposing, params, rngs) if proposing else {}
        draft_seconds = (time.perf_counter() - tick) / max(len(proposing), 1)  # one row's share of the batched calls
        proposals = {row: proposals.get(row, Proposal([], [])).cut(limits[row]) for row in lengths}
        lengths = {row: len(proposal.tokens) for row, proposal in proposals.items()}  # a lookup may find fewer
        tock = time.perf_counter()
        targets = score_batch(main, {row: unread_tokens(main.ids[row], histories[row]) for row in proposals}, proposals)
        verify_seconds = (time.perf_counter() - tock) / len(lengths)  # one row's share
        for row, length in lengths.items():
            proposal, row_draft_seconds = proposals[row], draft_seconds if row in proposing else 0.0
            kept, next_token = judge(proposal, targets[row], params, rngs[row])
            if not proposal.instead_of_draft:
                draft_length.update(length, kept, row_draft_seconds, verify_seconds, backlogs.get(row, 1), step, alone[row])
            alone[row] = alone[row] + 1 if length == 0 else 0
            stats.draft_seconds += row_draft_seconds
            stats.verify_seconds += verify_seconds
            stats.verify_calls += 1
            stats.proposed += length
            stats.accepted += kept
            stats.draft_lengths.append(length)
            new, stopped = _commit(proposal, kept, next_token, stop_tokens, max_new_tokens - len(outputs[row]))
            agreed = agreed_length(len(histories[row]), kept, len(new))
            main.keep(row, agreed)
            if length > 0:
                draft.keep(row, agreed)
            histories[row].extend(new)
            outputs[row].extend(new)
            if stopped or len(outputs[row]) >= max_new_tokens:
                active.discard(row)
        step += 1
    stats.new_tokens = sum(len(row) for row in outputs)
    stats.seconds = time.perf_counter() - started
    return outputs
