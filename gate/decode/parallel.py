"""`infer.py --input ... --parallel N`: up to N prompts decoded side by side in one llama.cpp context.

Each prompt runs the one-at-a-time Decoder with its own policy object over its own slot of a LlamaCppSlots
context (runtimes/batched.py); the Scheduler gathers every slot's pass into one llama_decode per round, so each
output is the one-at-a-time output wherever the model's batched passes are bit-exact. A slot takes the next prompt as soon as its prompt ends
(continuous batching); rows are handed to `emit` as they finish. Every slot gets the context the longest
prompt of the run needs. `choose_parallel` picks N from the measured cost of a pass over n sequences, and
`slot_profile` gives a policy's draft planner the cost of its own tokens inside such a pass. docs/batch.md
has the measurements.
"""
from __future__ import annotations

import dataclasses
from functools import partial
from typing import Callable

from common.errors import UsageError
from gate.decode.cost import MAX_CHAIN, Acceptance, CostProfile, Planner, batch_curve
from gate.decode.session import make_policy
from runtimes.batched import LlamaCppSlots, Scheduler
from runtimes.llamacpp import LlamaCppBackend
from runtimes.open import Runtime

TIE = 0.01          # --parallel auto: slot counts whose predicted job time is within 1% of the best count as a tie
CTX_STEP = 256      # slot contexts are rounded up to this many tokens


def choose_parallel(curve: dict[int, float], n_lines: int) -> int:
    """The number of slots that finishes n_lines prompts of similar length soonest by the measured curve: N slots
    take ceil(n_lines / N) rounds of passes, the last one over what is left (64 prompts on 48 slots: a round over
    48, then one over 16); the fewest slots within TIE of the best (less memory). Taking the most slots near the
    curve's top, as before, ran 64 prompts on 48 slots 8% slower than on 32 (docs/batch.md)."""
    ks = sorted(curve)
    c = CostProfile({}, 1.0, ks, [curve[k] for k in ks])        # interpolates between measured sizes

    def job(n: int) -> float:
        full, rest = divmod(n_lines, n)
        return full * c.of(n) + (c.of(rest) if rest else 0.0)
    sizes = range(1, max(1, min(ks[-1], n_lines)) + 1)
    best = min(job(n) for n in sizes)
    return min(n for n in sizes if job(n) <= (1 + TIE) * best)


def slot_profile(curve: dict[int, float], n: int, step_ms: float, key: dict) -> CostProfile:
    """The cost, to one of n sequences sharing each pass, of feeding k tokens, in units of its one-token share.
    A pass over T tokens costs about a + b*T steps; b is taken as the cost per token of the measured pass of at
    least 2n sequences (an upper bound on the slope: a noisy local slope once made drafts look free), a as what
    is left of the pass over n. The sequence pays a/n + b*k."""
    ks = sorted(curve)
    c = CostProfile({}, step_ms, ks, [curve[k] for k in ks])     # interpolates between measured sizes
    m = min((k for k in ks if k >= 2 * n), default=ks[-1])
    b = c.of(m) / m
    a = max(c.of(n) - b * n, 0.0)
    one = a / n + b
    costs = [round((a / n + b * k) / one, 4) for k in range(1, MAX_CHAIN + 2)]
    return CostProfile(dict(key, slots=n), round(step_ms * c.of(n) / n, 3), list(range(1, MAX_CHAIN + 2)), costs,
                       f"from the pass-cost curve over 1..{ks[-1]} sequences")


def open_slots(rt: Runtime, n: int, slot_ctx: int) -> dict[str | None, LlamaCppSlots]:
    """One LlamaCppSlots context per model of the runtime (None: the big model), each with n slots."""
    models = {None: rt.big, **rt.predictors}
    other = next((b.name for b in models.values() if not isinstance(b, LlamaCppBackend)), None)
    if other is not None:
        raise UsageError(f"--parallel: {other} does not run on llama.cpp; several prompts share a pass only there "
                         "(use --backend llama.cpp with GGUF models, or --parallel 1)")
    return {name: LlamaCppSlots(b.path, n, slot_ctx, name=b.name, n_threads=b.n_threads, weights_of=b)
            for name, b in models.items()}


def slot_runtime(rt: Runtime, slots: dict, i: int) -> Runtime:
    """Slot i's runtime: every model a SlotBackend, contexts as long as the slot's."""
    ctx = slots[None].slot_ctx
    return Runtime(rt.tokenizer, slots[None].slot(i), dataclasses.replace(rt.big_info, context_length=ctx),
                   predictors={name: s.slot(i) for name, s in slots.items() if name is not None},
                   eos_ids=rt.eos_ids,
                   infos={name: dataclasses.replace(info, context_length=ctx) for name, info in rt.infos.items()})


def slot_context(needs: list[int], rt: Runtime) -> int:
    """Tokens of context per slot: the longest prompt + its new tokens, rounded up, within every model's context."""
    limit = min(info.context_length or 1 << 30 for info in (rt.big_info, *rt.infos.values()))
    want = -(-max(needs, default=1) // CTX_STEP) * CTX_STEP
    return max(1, min(want, limit))


def run_parallel(rt: Runtime, lines: list, n: int, slot_ctx: int, args, policies,
                 row_of: Callable, emit: Callable, log: Callable[[str], None]) -> dict:
    """Decode `lines` with n slots; row_of(slot_rt, policy, line) makes a line's row, emit(line, row) takes it.
    Returns what the summary reports (slots, slot context, rounds, the planner's profile if any)."""
    slots = open_slots(rt, n, slot_ctx)
    runtimes = [slot_runtime(rt, slots, i) for i in range(n)]
    policy_objs = [make_policy(args, r, policies) for r in runtimes]
    plan = None
    if getattr(args, "planned", False) and policy_objs[0].name != "big":
        curve, step_ms, key = batch_curve(rt.big, 2 * n, log=log)   # slot_profile reads the pass over 2n
        profile = slot_profile(curve, n, step_ms, key)
        shared = policy_objs[0].acceptance()   # every slot's verified drafts teach one acceptance model
        for p in policy_objs:
            p.planner = Planner(profile, shared if isinstance(shared, Acceptance) else p.acceptance(),
                                backoff=not p.free)
        plan = dict(step_ms=profile.step_ms, cost_of_8_tokens=profile.of(8))
        log(f"parallel: one draft token costs a slot {profile.of(2) - 1:.2f} of its one-token share of a pass")
    queue = list(lines)

    def job(i: int) -> None:
        while queue:
            line = queue.pop(0)
            emit(line, row_of(runtimes[i], policy_objs[i], line))

    sched = Scheduler()
    sched.run([partial(job, i) for i in range(n)])
    for s in slots.values():
        s.close()
    return dict(parallel=n, slot_context=slot_ctx, rounds=sched.rounds, plan=plan)
