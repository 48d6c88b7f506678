"""One stage peer of a pipeline on a real swarm (``backend=hivemind``, pipeline.stages > 1): this process's
``WorkerGroup``.

Each process serves one stage; ``workers`` = K peers per stage (S x K processes). Its worker holds the stage's
parameters (``params``), so the strategies average exactly the stage among its peers, each stage over its own
averager (run id ``<run_id>_stage<s>``): ddp is SWARM, diloco is DiLoCo-SWARM, unchanged, as on ``sim``.

Stage-0 peers drive: peer i draws worker i's batches, cuts each into micro-batches and sends each through one peer
of every later stage (``pipeline/remote.py``; fixed routing: index i of every stage, falling back to the next live
one; stochastic: in proportion to the peers' announced throughput, seeded). A backward call carries the stage's
input again and its peer recomputes the forward (stateless, as hivemind's RemoteExpert), so a call that fails is
retried on another peer of the stage with what the driver kept, and nothing is needed from the failed one.

Later stages serve. A peer accumulates the gradient of every micro-batch it answers in a step, but a micro-batch
counts only once its driver confirms that this peer's answer is the one it used. At the end of its step a driver
asks each peer it used which of its micro-batches it holds ("check"), re-sends whatever a peer lost or a dead peer
held to another peer, then tells every live peer of the stage which micro-batches are its ("done"). A peer takes out
(recompute, negated gradient) what it answered but does not own: a duplicate or a late answer. A step is over at a
peer when every live driver said done, or called about a later step (a resync can move a driver on by more than one
step); drivers that died drop out and what they sent is taken out. So every micro-batch counts exactly once per
stage, including across a SIGKILLed peer (what that peer held is re-sent).

Who is live: the directory (``remote.py``), read at most once a second. A DHT read can miss a live record for a
moment, so a peer stays on the roster until its record says it left or it has been missing for ``ROSTER_GRACE``; a
peer whose call failed is suspected: left out of routing while its stage has an unsuspected peer, until it answers a
call or for ``DIRECTORY_TTL``, and it still gets its "done". Peers launched together wait (bounded) until every stage
lists all K, and a launched driver announces its first step (0) with its first record.

One gap: a peer killed after a driver's "done" and before its stage's averaging round takes that step's micro-batches
with it (the stage's round goes on without them; the driver logs nothing lost). A peer that dies before the "done"
loses nothing: what it held is re-sent to a peer not told yet.

A peer's gradient is the mean over its micro-batches, and its weight in the stage's average is the tokens it ran
(``tokens_per_step``): the work-weighted mean of the ``sim`` backend's ``StagedAverager``, which under ddp is the
mean gradient over every micro-batch of the step whatever the routing.

Evaluation (``evaluate``) is pipelined too: every driver sends the validation windows through the stages (calls that
read the stage at the step being evaluated, accumulating nothing) and tells every stage peer its loss ("eval_done");
a stage peer serves until every live driver is done and reports their mean.
"""

from __future__ import annotations

import logging
import math
import queue
import time
from collections.abc import Sequence

import numpy as np
import torch

from locoswarm.evaluation import val_windows
from locoswarm.pipeline.remote import NOT_YET, CallFailed, Listing, Request, StageLink
from locoswarm.pipeline.routing import Router
from locoswarm.pipeline.stages import StageSpec, stage_forward
from locoswarm.worker import Worker, WorkerGroup, check_counts

log = logging.getLogger(__name__)

PATIENCE = 120.0  # seconds a stage may have no live peer (or a peer no live driver) before the run gives up
ROSTER_GRACE = 20.0  # seconds a peer missing from the directory stays on our roster (a DHT read can miss a record)
RATE_SMOOTHING = 0.5
TRAIN_KINDS = ("forward", "last", "backward", "check", "done")
EVAL_KINDS = ("eval", "eval_done")


def _int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


class StagePeerGroup(WorkerGroup):
    def __init__(
        self,
        worker: Worker,
        specs: Sequence[StageSpec],
        stage: int,
        lanes: int,
        link: StageLink,
        router: Router,
        microbatches: int,
        launched: int = 0,
    ):
        """worker: this peer's replica (index = its rank within the stage; a driver's sampler is that worker's
        shard); specs: every stage; lanes: K, peers per stage; router: picks the peer of a later stage a
        micro-batch goes through (global ids s * K + index); launched: peers per stage launched together with us
        (our first step waits until all are listed; 0: we joined)."""
        self.specs, self.stage, self.lanes, self.link, self.router = list(specs), stage, lanes, link, router
        self.stages, self.microbatches = len(self.specs), microbatches
        self.spec = self.specs[stage]
        self.last = self.stage == self.stages - 1
        every = list(worker.model.parameters())
        worker.params = [every[i] for i in self.spec.params]  # this peer's part of the model: what it averages
        worker.clip_groups = [worker.params]
        super().__init__([worker])
        self.worker = worker
        self.index = worker.rank
        self._boundary_step = 0  # the step of the last round boundary
        self._counted = 0  # micro-batches counted since then (a stage peer's work)
        self._later: list[Request] = []  # calls for a step we have not reached yet
        self._records: dict[tuple[int, int], tuple[str, list[torch.Tensor]]] = {}  # this step: (driver, mb) -> call
        self._done: set[int] = set()  # drivers that said done for this step
        self._losses: list[float] = []
        self._eval_losses: dict[int, float] = {}
        self._roster: dict[bytes, tuple[Listing, float]] = {}  # peer id -> (its last listing, when we saw it)
        self._read_at = 0.0
        self._since = self._fresh_stats()
        self._seen_bytes = 0
        self.failures = 0
        self._expect = launched  # peers launched with us, per stage: our first step waits for them

    # ------------------------------------------------------------------ what a strategy sees
    @property
    def mb_tokens(self) -> int:
        return self.worker.tokens_per_step // self.microbatches

    def tokens_per_step(self) -> torch.Tensor:
        """A driver: its batch. A later stage: the tokens it counted since the last round, per step."""
        if self.stage == 0:
            return super().tokens_per_step()
        steps = max(1, self.worker.step - self._boundary_step)
        return torch.tensor([self._counted * self.mb_tokens / steps], dtype=torch.float64)

    def _boundary(self) -> None:
        self._boundary_step, self._counted = self.worker.step, 0

    def apply_grads(self, grads: Sequence[torch.Tensor]) -> None:
        super().apply_grads(grads)
        self._boundary()  # a ddp step (or a synchronous warm-up step) is a round

    def load_params(self, tensors: Sequence[torch.Tensor], idx: Sequence[int] | None = None) -> None:
        super().load_params(tensors, idx)
        if idx is None:
            self._boundary()

    def compute_grads(self) -> tuple[list[float], list[torch.Tensor], list[float]]:
        t0 = time.perf_counter()
        loss, count = self._step()
        with torch.no_grad():
            for p in self.worker.params:
                p.grad = torch.zeros_like(p) if count == 0 or p.grad is None else p.grad.div_(count)
        grads = [p.grad.unsqueeze(0) for p in self.worker.params]
        return [loss], grads, [time.perf_counter() - t0]

    def inner_steps(self, n: int, counts: Sequence[int] | None = None) -> tuple[list[list[float]], list[float]]:
        counts = check_counts(n, counts, 1)
        losses, t0 = [], time.perf_counter()
        for _ in range(counts[0]):
            loss, count = self._step()
            with torch.no_grad():
                for p in self.worker.params:  # no micro-batch: no gradient, and the optimiser leaves it alone
                    p.grad = None if count == 0 or p.grad is None else p.grad.div_(count)
            self.worker.apply_grads()
            losses.append([loss])
        losses += [[math.nan]] * (n - counts[0])
        return losses, [time.perf_counter() - t0]

    def _step(self) -> tuple[float, int]:
        """One step of this peer's role: (its loss, NaN if it computes none; the micro-batches it counted)."""
        self.worker.optimizer.zero_grad(set_to_none=True)
        if self._expect:
            self._await_launched()
        if self.stage == 0:
            self._since["microbatches"] += self.microbatches
            return self._drive(self.worker.step), self.microbatches
        return self._serve(self.worker.step)

    def take_stats(self) -> dict:
        """Since the last call: activation bytes that reached this peer, failed calls and micro-batches lost (a
        driver's), micro-batches counted (a later stage's); the live peers per stage."""
        since, self._since = self._since, self._fresh_stats()
        since["activation_bytes"] = float(self.link.bytes_received - self._seen_bytes)
        self._seen_bytes = self.link.bytes_received
        peers = [0] * self.stages
        for r in self._listings():
            peers[r.stage] += 1
        load = [[since["microbatches"] if s == self.stage else 0] for s in range(self.stages)]
        return {**since, "stage_moves": 0, "rebalance_bytes": 0.0, "stage_peers": peers, "stage_load": load}

    @staticmethod
    def _fresh_stats() -> dict:
        return {"activation_bytes": 0.0, "stage_failures": 0, "lost_microbatches": 0, "microbatches": 0}

    # ------------------------------------------------------------------ who is there
    def _listings(self, stage: int | None = None, fresh: bool = False, suspected: bool = False) -> list[Listing]:
        """The stage peers we know (of ``stage``; default all), by (stage, index). A DHT read can miss a live record
        for a moment, so a peer stays on our roster until its record says it left or we have not seen it for
        ``ROSTER_GRACE`` seconds. A peer that has not announced its first step is not listed: a joiner is still
        downloading its stage's state and would hold a call (or a "done") until it has. suspected: include peers
        whose call failed lately (still owed a "done")."""
        now = time.monotonic()
        if fresh or now - self._read_at > 1.0:
            for peer, r in self.link.directory().items():
                if r is None:
                    self._roster.pop(peer, None)
                else:
                    self._roster[peer] = (r, now)
            self._read_at = now
        out = [r for r, seen in self._roster.values() if now - seen <= ROSTER_GRACE and r.joined < NOT_YET
               and (stage is None or r.stage == stage) and (suspected or not self.link.suspected(r.peer))]  # fmt: skip
        return sorted(out, key=lambda r: (r.stage, r.index, r.peer))

    def _announce_joined(self, step: int) -> None:
        """A joiner's first step: its directory record says it takes part from ``step`` on (``_listings`` lists it
        from then on). Anyone else has a step in its record already."""
        if self.link.joined == NOT_YET:
            self.link.joined = step
            self.link.announce()

    def _await_launched(self) -> None:
        """Peers launched together: wait (bounded) until the directory lists all K peers of every stage, so the first
        step neither misses a peer that is still starting nor routes around it."""
        want, self._expect = self._expect, 0
        end = time.monotonic() + PATIENCE / 2
        while time.monotonic() < end:
            seen = self._listings(fresh=True)  # drivers count once they announce their first step
            counts = [sum(r.stage == s for r in seen) for s in range(self.stages)]
            if min(counts) >= want:
                return
            time.sleep(0.25)
        log.warning("the directory lists %s peers per stage, not %d each; starting anyway", counts, want)

    # ------------------------------------------------------------------ a driver (stage 0)
    def _drive(self, step: int) -> float:
        w, last = self.worker, self.stages - 1
        x, y = w.sampler.next()
        self._announce_joined(step)  # a joiner: the stage peers' barriers wait for us from this step on
        kept: dict[tuple[int, int], list[tuple[str, torch.Tensor]]] = {}  # (stage, mb) -> its call's tensors
        owner: dict[tuple[int, int], Listing] = {}
        losses = []
        for m, (xm, ym) in enumerate(zip(x.chunk(self.microbatches), y.chunk(self.microbatches), strict=True)):
            mb = self.index * self.microbatches + m
            out = stage_forward(w.model, self.spec, False, xm.to(w.device))
            h, inputs = out.detach(), {}
            for s in range(1, last):  # forward through the middle stages: nothing accumulates
                inputs[s] = h
                reply, (h,), _ = self._call(s, step, mb, 0, {"kind": "forward"}, [("act", h)])
            kept[(last, mb)] = [("act", h), ("ids", ym)]
            reply, (grad,), owner[(last, mb)] = self._call(last, step, mb, 1, {"kind": "last"}, kept[(last, mb)])
            losses.append(float(reply["loss"]))
            for s in reversed(range(1, last)):
                kept[(s, mb)] = [("act", inputs[s]), ("act", grad)]
                _, (grad,), owner[(s, mb)] = self._call(s, step, mb, 1, {"kind": "backward"}, kept[(s, mb)])
            out.backward(grad.to(out.dtype))
        self._confirm(step, kept, owner)
        return sum(losses) / len(losses)

    def _call(self, s: int, step: int, mb: int, direction: int, header: dict, tensors, avoid=frozenset(),
              patience: float = PATIENCE) -> tuple:  # fmt: skip
        """Call a live peer of stage ``s`` (not one in ``avoid``, by id) about micro-batch ``mb``: (reply, tensors,
        peer). A peer that fails is suspected and the next one tried; once only suspected peers are left (a call
        can fail on a live peer too: hivemind's stream sometimes ends without the reply), they are tried again every
        half second for up to ``patience`` seconds."""
        give_up, attempt = time.monotonic() + patience, 0
        while True:
            listing = self._route(s, step, mb, direction, attempt, avoid)
            suspected = listing is None or self.link.suspected(listing.peer)
            if listing is not None:
                try:
                    reply, out, _ = self.link.call(listing, {**header, "step": step, "driver": self.index,
                                                                "mb": mb}, tensors)  # fmt: skip
                    return reply, out, listing
                except CallFailed as e:
                    self._failed(listing, str(e))
                    attempt += 1
            if suspected:
                if time.monotonic() >= give_up:
                    raise RuntimeError(f"stage {s} had no live peer that answered for {patience:.0f}s")
                time.sleep(0.5)

    def _failed(self, listing: Listing, why: str) -> None:
        self.link.suspect(listing.peer, why)
        self.failures += 1
        self._since["stage_failures"] += 1

    def _route(self, s: int, step: int, mb: int, direction: int, attempt: int, avoid=frozenset()) -> Listing | None:
        """The peer of stage ``s`` for this call: among those not suspected, else (all are) among the suspected."""
        peers = {r.index: r for r in self._listings(s) if r.index < self.lanes and r.peer not in avoid}
        peers = peers or {r.index: r for r in self._listings(s, suspected=True) if r.index < self.lanes
                          and r.peer not in avoid}  # fmt: skip
        if not peers:
            self._read_at = 0.0  # read the directory again before the next try
            return None
        live = [s * self.lanes + i if i in peers else None for i in range(self.lanes)]
        for i, r in peers.items():  # the router's throughput: what each peer announced (0: not measured yet)
            self.router.throughput[s * self.lanes + i] = r.rate if r.rate > 0 else None
        return peers[self.router.pick(s, self.index, live, (step, mb, direction, attempt))]  # a column: the index

    def _confirm(self, step: int, kept: dict, owner: dict[tuple[int, int], Listing]) -> None:
        """Make every micro-batch count exactly once at every later stage: check with the peers we used, re-send what
        they do not hold, then tell every live peer of the stage what is its (the barrier)."""
        for s in range(1, self.stages):
            kind = "last" if s == self.stages - 1 else "backward"
            for _ in range(16):
                missing = []
                for peer, mbs in _by_peer(owner, s).values():
                    try:
                        reply, _, _ = self.link.call(peer, {"kind": "check", "step": step, "driver": self.index,
                                                            "owned": mbs})  # fmt: skip
                        missing += [m for m in reply.get("missing", []) if m in mbs]
                    except CallFailed as e:
                        self._failed(peer, str(e))
                        missing += mbs
                if not missing:
                    break
                log.info("step %d: re-sending %d micro-batch(es) of stage %d held by no live peer", step,
                         len(missing), s)  # fmt: skip
                for mb in missing:
                    _, _, owner[(s, mb)] = self._call(s, step, mb, 1, {"kind": kind}, kept[(s, mb)])
            self._tell_done(step, s, kind, kept, owner)

    def _tell_done(self, step: int, s: int, kind: str, kept: dict, owner: dict[tuple[int, int], Listing]) -> None:
        """Tell every live peer of stage ``s`` which of our micro-batches are its. Owners first: what one of them no
        longer holds (it died since the check) is re-sent to a peer not told yet, which then owns it; a peer told
        "done" may already be averaging, so only what no untold peer can take is lost."""
        told: set[bytes] = set()
        peers = self._listings(s, fresh=True, suspected=True)  # every peer of the stage waits for our "done"
        while len(told) < len(peers):
            mine = _by_peer(owner, s)
            peer = min((p for p in peers if p.peer not in told), key=lambda p: (p.peer not in mine, p.index))
            mbs = mine.get(peer.peer, (peer, []))[1]
            told.add(peer.peer)
            try:
                reply, _, _ = self.link.call(peer, {"kind": "done", "step": step, "driver": self.index, "owned": mbs})
                missing = [m for m in reply.get("missing", []) if m in mbs]
            except CallFailed as e:
                self._failed(peer, str(e))
                missing = mbs
            for mb in missing:
                try:  # only to a peer routable now: one that is not may never come back
                    _, _, owner[(s, mb)] = self._call(s, step, mb, 1, {"kind": kind}, kept[(s, mb)], told, patience=0)
                except RuntimeError:
                    log.warning("step %d: micro-batch %d of stage %d lost with peer %d", step, mb, s, peer.index)
                    self._since["lost_microbatches"] += 1
                    continue
                if owner[(s, mb)].peer not in {p.peer for p in peers}:  # it joined since our read: tell it too
                    peers.append(owner[(s, mb)])

    # ------------------------------------------------------------------ a later stage
    def _serve(self, step: int) -> tuple[float, int]:
        """Serve this step's calls until every live driver said done. Returns (mean loss of the micro-batches
        counted, NaN unless the last stage; their number)."""
        self._records, self._done, self._losses = {}, set(), []
        self._announce_joined(step)  # a joiner with the stage's state: drivers may call us from now on
        self._wait_for_drivers(step, self._done, TRAIN_KINDS)
        for driver in {d for d, _ in self._records} - self._done:  # its driver is gone: never confirmed
            self._disown(driver, [])
        count = len(self._records)
        self._counted += count
        self._since["microbatches"] += count
        losses = [loss for loss in self._losses if not math.isnan(loss)]
        return (sum(losses) / len(losses) if losses else math.nan), count

    def _wait_for_drivers(self, step: int, done: set[int], kinds: tuple[str, ...]) -> None:
        quiet_since = time.monotonic()
        while True:
            owing = {r.index for r in self._listings(0) if r.joined <= step}
            if owing and owing <= done:
                return
            if owing:
                quiet_since = time.monotonic()
            elif time.monotonic() - quiet_since > PATIENCE:
                raise RuntimeError(f"no live stage-0 peer (driver) for {PATIENCE:.0f}s at step {step}")
            request = self._next_request(step, kinds)
            if request is not None:
                self._handle(request, step)

    def _next_request(self, step: int, kinds: tuple[str, ...]) -> Request | None:
        for i, r in enumerate(self._later):
            if self._due(r, step, kinds):
                return self._later.pop(i)
        try:
            r = self.link.requests.get(timeout=0.2)
        except queue.Empty:
            return None
        if self._due(r, step, kinds) or self._stale(r, step):
            return r
        log.debug("at step %d: keeping %s for later", step, {k: v for k, v in r.header.items() if k != "tensors"})
        self._later.append(r)
        driver = r.header.get("driver")
        if _int(driver) and driver not in self._done:
            # A driver calling about a later step (or, while we evaluate, about training) is past this one: a resync
            # can move a driver's step on by more than one. Nothing it sent for this step was confirmed.
            log.info("step %d: driver %d is past it (it called about step %s)", step, driver, r.header.get("step"))
            if kinds == TRAIN_KINDS:
                self._disown(driver, [])
            self._done.add(driver)
        return None

    @staticmethod
    def _due(r: Request, step: int, kinds: tuple[str, ...]) -> bool:
        kind, at = r.header.get("kind"), r.header.get("step")
        return at == step and (kind in kinds or kind == "eval")  # an eval call reads the params: any time at its step

    @staticmethod
    def _stale(r: Request, step: int) -> bool:
        at = r.header.get("step")
        return not _int(at) or at < step or r.header.get("kind") not in (*TRAIN_KINDS, *EVAL_KINDS)

    def _handle(self, r: Request, step: int) -> None:
        h = r.header
        log.debug("at step %d: serving %s", step, {k: v for k, v in h.items() if k != "tensors"})
        kind, driver = h.get("kind"), h.get("driver")
        if not _int(driver) or driver >= self.lanes or not _int(h.get("step")):
            return r.refuse("driver and step must be integers in range")
        if h["step"] < step:
            if kind in ("check", "done"):  # we are past it: whatever it sent then is not ours
                return r.answer({"missing": h.get("owned", [])})
            return r.refuse(f"step {h['step']} is over here (at {step})")
        try:
            if kind == "eval_done":
                loss = h.get("loss")
                if isinstance(loss, int | float) and math.isfinite(loss):
                    self._eval_losses[driver] = float(loss)
                self._done.add(driver)
                return r.answer({})
            if kind in ("check", "done"):
                owned = h.get("owned")
                if not isinstance(owned, list) or not all(_int(m) and m < self.microbatches * self.lanes
                                                          for m in owned):  # fmt: skip
                    return r.refuse("owned: not a list of micro-batch numbers")
                if kind == "done":
                    self._disown(driver, owned)
                    self._done.add(driver)
                return r.answer({"missing": [m for m in owned if (driver, m) not in self._records]})
            mb = h.get("mb")
            if not _int(mb):
                return r.refuse("mb must be an integer")
            if kind == "forward" or kind == "eval":
                with torch.no_grad():
                    out = self._forward(r.tensors)
                return r.answer({"loss": float(out)} if self.last else {}, [] if self.last else [("act", out)])
            if kind in ("last", "backward") and (kind == "last") == self.last:
                self._compute(r, driver, mb)
                return None
            return r.refuse(f"kind {kind!r} is not served by stage {self.stage}")
        except (RuntimeError, ValueError, IndexError) as e:  # a body that does not fit the stage
            return r.refuse(f"{type(e).__name__}: {e}")

    def _forward(self, tensors: list[torch.Tensor]) -> torch.Tensor:
        w = self.worker
        x = tensors[0].to(w.device)
        if self.last:
            if len(tensors) != 2:
                raise ValueError("the last stage needs the activation and the targets")
            return stage_forward(w.model, self.spec, True, x, tensors[1].to(w.device))
        return stage_forward(w.model, self.spec, False, x)

    def _compute(self, r: Request, driver: int, mb: int) -> None:
        """A micro-batch's backward through our stage (recomputing its forward); its gradient accumulates unless we
        have it already this step (a retry that reached us twice)."""
        t0 = time.perf_counter()
        key = (driver, mb)
        x = r.tensors[0].to(self.worker.device).requires_grad_()
        out = self._forward([x, *r.tensors[1:]] if self.last else [x])
        seed = None if self.last else r.tensors[1].to(out.dtype)
        if not self.last and seed.shape != out.shape:
            raise ValueError(f"gradient of shape {tuple(seed.shape)} for an output of {tuple(out.shape)}")
        if key in self._records:
            (grad,) = torch.autograd.grad(out, x, seed)
        else:
            out.backward(seed)
            grad = x.grad
            self._records[key] = (r.header["kind"], [t.detach() for t in r.tensors])
            if self.last:
                self._losses.append(float(out.detach()))  # (a micro-batch taken out later still counts here: a log)
        seconds = time.perf_counter() - t0
        rate = 1.0 / max(seconds, 1e-6)
        self.link.rate = rate if self.link.rate == 0 else RATE_SMOOTHING * rate + (1 - RATE_SMOOTHING) * self.link.rate
        r.answer({"loss": float(out.detach())} if self.last else {}, [("act", grad)])

    def _disown(self, driver: int, owned: Sequence[int]) -> None:
        """Take out what we answered for ``driver`` this step but it did not confirm as ours (negated recompute)."""
        for key in [k for k in self._records if k[0] == driver and k[1] not in owned]:
            _, tensors = self._records.pop(key)
            x = tensors[0].to(self.worker.device).requires_grad_()
            out = self._forward([x, *tensors[1:]] if self.last else [x])
            if self.last:
                (-out).backward()
            else:
                out.backward(-tensors[1].to(out.dtype))

    # ------------------------------------------------------------------ evaluation, pipelined
    @torch.no_grad()
    def evaluate(self, val: np.ndarray, batch_size: int, batches: int) -> float:
        """The validation loss of the pipeline as it is now (the windows of ``bookkeeping.evaluate``)."""
        step = self.worker.step
        if self.stage > 0:
            self._eval_losses, self._done = {}, set()
            self._wait_for_drivers(step, self._done, EVAL_KINDS)
            losses = list(self._eval_losses.values())
            return sum(losses) / len(losses) if losses else math.nan
        w, total = self.worker, 0.0
        for b, (x, y) in enumerate(val_windows(val, w.model.shape.seq_len, batch_size, batches)):
            h = stage_forward(w.model, self.spec, False, x.to(w.device))
            for s in range(1, self.stages):
                last = s == self.stages - 1
                body = [("act", h), ("ids", y)] if last else [("act", h)]
                reply, out, _ = self._call(s, step, b, 0, {"kind": "eval"}, body)
                h = reply["loss"] if last else out[0]
            total += float(h)
        loss = total / batches
        for s in range(1, self.stages):
            for peer in self._listings(s, fresh=True, suspected=True):
                try:
                    self.link.call(peer, {"kind": "eval_done", "step": step, "driver": self.index, "mb": 0,
                                          "loss": loss})  # fmt: skip
                except CallFailed as e:
                    self._failed(peer, str(e))
        return loss

    def close(self) -> None:
        self.link.close()


def _by_peer(owner: dict[tuple[int, int], Listing], stage: int) -> dict[bytes, tuple[Listing, list[int]]]:
    """Stage ``stage``'s micro-batches by the peer (id) that owns them: {peer id: (its latest listing, mbs)}."""
    out: dict[bytes, tuple[Listing, list[int]]] = {}
    for (s, m), peer in sorted(owner.items(), key=lambda kv: kv[0]):
        if s == stage:
            out[peer.peer] = (peer, [*out.get(peer.peer, (peer, []))[1], m])
    return out
