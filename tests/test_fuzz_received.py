"""Fuzzing what a peer receives from its groupmates on ``backend=hivemind``: nothing another peer sends may crash or
hang the receiver; a malformed input is a logged rejection of its sender (``Round.rejected`` names the sender's rank,
or -1, and/or a WARNING line), and a well-formed one is used exactly as the sim's arithmetic says.

Pure decoding layers (fast, many hypothesis examples, no network):

- a groupmate's packed payload (``LocalCodecs.decode_row``, every codec) and the screening after it (``combine``);
- the reduce-scatter's slices (``reduce_owned_screened``) and reduced chunks (``assemble``);
- an owner's screening report (``_unpack_report``) and a groupmate's matchmaking metadata (``malformed_metadata``).

Real peers (``network``, ``slow``): each test starts its peers once, in spawned processes (real HivemindAverager
objects, their DHT, matchmaking and PayloadMailbox on 127.0.0.1), and runs a bounded number of hypothesis examples,
each one real round (or one state download) in which a test-only malicious peer sends the fuzzed bytes:

- payloads through the all-gather (topk, aggregator=median) and the re-quantising reduce-scatter (int8, mean);
- matchmaking metadata; raw mailbox messages (any header, any length); a run-state blob for ``_download``.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import multiprocessing as mp
import os
import pickle
import queue
import random
import struct
import time
import traceback

import pytest
import torch
from hypothesis import HealthCheck, Phase, example, given, settings
from hypothesis import strategies as st

from locoswarm.comm.aggregate import Median, WeightedMean, combine
from locoswarm.comm.exchange import LocalCodecs, merge_dropped
from locoswarm.comm.hivemind import REPORT_LIMIT, _is_int, _unpack_report, malformed_metadata
from locoswarm.config import CompressionConfig

SHAPES = [(16, 8), (40,)]
SEED = 7
WEIGHTS = (1.0, 2.0)  # rank 0 (the honest receiver), rank 1 (the fuzzing peer)
SHARES = [w / sum(WEIGHTS) for w in WEIGHTS]

# the network tests' clocks: a group of two forms as soon as both are in matchmaking, so only a round that goes
# wrong waits; every wait is bounded
BACKEND = dict(matchmaking_time=4.0, min_matchmaking_time=2.0, round_timeout=5.0)
ROUND_LIMIT = 60.0  # a round that takes longer than this is a hang
NETWORK = dict(deadline=None, database=None, phases=[Phase.explicit, Phase.generate], report_multiple_bugs=False,
               suppress_health_check=list(HealthCheck))  # fmt: skip


def _inputs(rank: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + rank)
    return [torch.randn(s, generator=g) for s in SHAPES]


def _compression(name: str) -> CompressionConfig:
    return CompressionConfig(name=name, ratio=0.25, block_size=16, rank=2)


def _codecs(name: str) -> LocalCodecs:
    return LocalCodecs(_compression(name), SEED)


# ---------------------------------------------------------------------------------------------- byte mutations
def _mutate(blob: bytes, mutation: tuple) -> bytes:
    """Apply a mutation (picklable, so a peer process can apply it to the bytes it is about to send)."""
    kind = mutation[0]
    if kind == "keep":
        return blob
    if kind == "replace":
        return mutation[1]
    if kind == "extend":
        return blob + mutation[1]
    if not blob:
        return blob
    if kind == "truncate":  # strictly shorter
        return blob[: mutation[1] % len(blob)]
    out = bytearray(blob)
    if kind == "flip":
        for bit in mutation[1]:
            bit %= 8 * len(out)
            out[bit // 8] ^= 1 << (bit % 8)
    elif kind == "scramble":  # random bytes of exactly the valid length (they pass the length check)
        out = bytearray(random.Random(mutation[1]).randbytes(len(out)))
    elif kind == "word":  # one aligned 4-byte word (an index, a value, a scale) set to an extreme fp32
        start = 4 * (mutation[1] % max(1, len(out) // 4))
        out[start : start + 4] = mutation[2][: len(out) - start]
    elif kind == "overwrite":
        start = mutation[1] % len(out)
        data = mutation[2][: len(out) - start]
        out[start : start + len(data)] = data
    else:
        raise ValueError(f"unknown mutation {kind!r}")
    return bytes(out)


MUTATIONS = st.one_of(
    st.tuples(st.just("replace"), st.binary(max_size=700)),  # random bytes
    st.tuples(st.just("truncate"), st.integers(0, 10**6)),
    st.tuples(st.just("extend"), st.binary(min_size=1, max_size=64)),
    st.tuples(st.just("flip"), st.lists(st.integers(0, 10**7), min_size=1, max_size=4).map(tuple)),
    st.tuples(st.just("overwrite"), st.integers(0, 10**6), st.binary(min_size=1, max_size=32)),
    st.tuples(
        st.just("word"),
        st.integers(0, 10**6),
        st.sampled_from([3e38, -3e38, 1e30, math.inf, math.nan, -1.0]).map(lambda v: struct.pack("<f", v)),
    ),
    st.tuples(st.just("scramble"), st.integers(0, 2**32)),
    st.just(("keep",)),
)


# msgpack-able values (what hivemind can carry as a groupmate's metadata): every type, huge and non-finite numbers
SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**63), 2**64 - 1),
    st.sampled_from([0, 1, 2, -1, 2**63 - 1, 2**64 - 1, -(2**63), 10**18]),
    st.floats(),
    st.sampled_from([math.nan, math.inf, -math.inf, 1e308, -1e308, 5e-324, -0.0, 0.5]),
    st.text(max_size=12),
    st.binary(max_size=12),
)
VALUES = st.recursive(
    SCALARS, lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=6), inner, max_size=3)),
    max_leaves=6,
)  # fmt: skip
KEY_ACTIONS = st.one_of(st.just(("keep",)), st.just(("drop",)), st.tuples(st.just("set"), VALUES))
META_MUTATIONS = st.one_of(
    st.tuples(
        st.just("keys"),
        st.fixed_dictionaries({k: KEY_ACTIONS for k in ("t", "w", "round", "rank")}),
        st.dictionaries(st.text(max_size=6), VALUES, max_size=2),
    ),
    st.tuples(st.just("whole"), VALUES),
)
KEEP_ALL = ("keys", dict.fromkeys(("t", "w", "round", "rank"), ("keep",)), {})


def _mutate_metadata(meta: dict, mutation: tuple):
    if mutation[0] == "whole":
        return mutation[1]
    out = dict(meta)
    for key, action in mutation[1].items():
        if action[0] == "drop":
            out.pop(key, None)
        elif action[0] == "set":
            out[key] = action[1]
    out.update(mutation[2])
    return out


# ---------------------------------------------------------------------------------------------- pure layers
@contextlib.contextmanager
def _warnings(name: str = "locoswarm"):
    """WARNING+ messages logged under ``name`` inside the block."""
    seen: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(record.getMessage())

    handler = Keep(logging.WARNING)
    logger = logging.getLogger(name)
    logger.addHandler(handler)
    try:
        yield seen
    finally:
        logger.removeHandler(handler)


CODECS = ["none", "fp16", "bf16", "int8", "int4", "sign", "topk", "blocktopk", "randomk", "powersgd"]


@pytest.mark.parametrize("name", CODECS)
@settings(max_examples=150, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutation=MUTATIONS)
@example(mutation=("word", 7, struct.pack("<f", math.inf)))
@example(mutation=("flip", (5,)))
def test_a_malformed_payload_fails_to_decode_with_a_valueerror_and_is_screened(name, mutation):
    """What ``_gather_mean`` does with a groupmate's all-gathered bytes: ``decode_row`` (it catches only ValueError,
    and drops the sender), then ``combine`` (non-finite rows are screened out and reported)."""
    codecs = _codecs(name)
    like = codecs.encode(_inputs(0), round_=3)
    theirs = LocalCodecs.pack(_codecs(name).encode(_inputs(1), round_=3))
    received = _mutate(theirs, mutation)
    try:
        row = codecs.decode_row(received, like)
    except ValueError as e:  # anything else would escape the round
        assert received != theirs, f"a valid payload was refused: {e}"
        return
    assert len(received) == len(theirs), "a payload of the wrong length was decoded"
    assert [(t.shape, t.dtype) for t in row] == [(t.shape, t.dtype) for t in _inputs(1)]
    if received == theirs:
        assert all(torch.equal(a, b) for a, b in zip(row, codecs.decode_row(theirs, like), strict=True))
    finite = all(bool(torch.isfinite(t).all()) for t in row)
    own = codecs.decode_row(LocalCodecs.pack(like), like)
    for aggregator in (WeightedMean(), Median()):
        mean, dropped = combine(aggregator, [own, row], SHARES)
        assert all(bool(torch.isfinite(t).all()) for t in mean), "a non-finite row reached the result"
        assert (1 in dropped) == (not finite) and 0 not in dropped, dropped


@pytest.mark.parametrize("name", ["int8", "int4", "sign", "blocktopk"])
@settings(max_examples=150, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(stage=st.sampled_from(["scatter", "reduced"]), mutation=MUTATIONS)
@example(stage="reduced", mutation=("word", 27, struct.pack("<f", 3e38)))  # a scale: finite, its products are not
@example(stage="scatter", mutation=("word", 27, struct.pack("<f", 3e38)))  # the same in a slice: screened out
@example(stage="scatter", mutation=("word", 0, b"\x80\x80\x80\x80"))  # int8 code -128
def test_a_malformed_slice_or_reduced_chunk_fails_with_a_valueerror(name, stage, mutation):
    """The reduce-scatter of two owners. Stage 1: owner 0 screens a fuzzed slice from member 1 (``_reduce_mean``
    turns its ValueError into a failed round); stage 2: member 0 assembles a fuzzed reduced chunk of owner 1, which
    must be refused (ValueError) unless it decodes to finite values: nobody screens a reduced chunk after it."""
    mine, theirs = _codecs(name), _codecs(name)
    like0, like1 = mine.encode(_inputs(0)), theirs.encode(_inputs(1))
    slices0, slices1 = mine.split(like0, 2), theirs.split(like1, 2)
    if stage == "scatter":
        piece = _mutate(slices1[0], mutation)
        try:
            reduced0, report0 = mine.reduce_owned_screened(0, 2, [slices0[0], piece], SHARES, like0)
        except ValueError as e:
            assert piece != slices1[0], f"a valid slice was refused: {e}"
            return
        assert set().union(*report0) <= {1}, report0
        reduced1, _ = theirs.reduce_owned_screened(1, 2, [slices0[1], slices1[1]], SHARES, like1)
        mean = mine.assemble([reduced0, reduced1], like0)  # an owner's chunk of screened pieces is always usable
    else:
        reduced0, _ = mine.reduce_owned_screened(0, 2, [slices0[0], slices1[0]], SHARES, like0)
        honest, _ = theirs.reduce_owned_screened(1, 2, [slices0[1], slices1[1]], SHARES, like1)
        chunk = _mutate(honest, mutation)
        try:
            mean = mine.assemble([reduced0, chunk], like0)
        except ValueError as e:
            assert chunk != honest, f"a valid chunk was refused: {e}"
            return
    assert [t.shape for t in mean] == [torch.Size(s) for s in SHAPES]
    assert all(bool(torch.isfinite(t).all()) for t in mean), "a non-finite mean was assembled"


JSON = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=12)),
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=6), inner, max_size=3)),
    max_leaves=8,
)


def _report_values():
    keys = st.one_of(st.integers(-3, 5).map(str), st.text(max_size=4))
    reports = st.lists(st.dictionaries(keys, JSON, max_size=3), max_size=3)
    return st.one_of(reports, JSON, st.lists(JSON, max_size=3))


def _expected_report(blob: bytes, owners: int) -> list[dict[int, str]] | None:
    """The spec: a JSON list of {member index in [0, owners): reason} (an empty object or string reads as an empty
    list); None: malformed."""
    try:
        report = json.loads(blob.decode())
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    if isinstance(report, dict | str) and not report:
        return []
    if not isinstance(report, list) or not all(isinstance(d, dict) for d in report):
        return None
    out = []
    for d in report:
        try:
            keys = [int(k) for k in d]
        except ValueError:
            return None
        if not all(0 <= k < owners for k in keys):
            return None
        out.append({int(k): str(v) for k, v in d.items()})
    return out


@settings(max_examples=400, deadline=None, database=None)
@given(
    blob=st.one_of(
        st.binary(max_size=200),
        _report_values().map(lambda v: json.dumps(v).encode()),
        _report_values().map(lambda v: json.dumps(v).encode()[:-1]),
    ),
    owners=st.integers(1, 4),
)
@example(blob=b"", owners=2)
@example(blob=b'[{"0": "non-finite values"}, {}]', owners=2)
@example(blob=b'[{"2": "x"}]', owners=2)
@example(blob=b"\xff\xfe", owners=2)
@example(blob=b'[{"1' + b"0" * 5000 + b'": "x"}]', owners=2)  # an int too long to parse
def test_a_malformed_screening_report_is_ignored_with_a_warning(blob, owners):
    """The bytes after an owner's reduced chunk: a malformed report is ignored (logged); a well-formed one is kept."""
    expected = _expected_report(blob, owners) if blob else []
    with _warnings("locoswarm.comm.hivemind") as seen:
        got = _unpack_report(blob, owners, "peer-x")
    if expected is None:
        assert got == [] and any("malformed screening report from peer-x" in m for m in seen), (got, seen)
    else:
        assert got == expected and not seen, (got, seen)
    # merged with an honest owner's report of two tensors (``_reduce_mean``): whatever its length, nothing raises
    honest = [{1: "non-finite values"}, {}]
    merged = merge_dropped([honest, got])
    assert set(merged) == {1}.union(*got) and all(isinstance(v, str) for v in merged.values()), merged


@pytest.mark.parametrize("blob", [b"[" * 100_000, b'[{"0": ' * 5_000], ids=["arrays", "objects"])
def test_a_deeply_nested_screening_report_is_ignored_not_raised(blob):
    with _warnings("locoswarm.comm.hivemind") as seen:
        got = _unpack_report(blob, 2, "peer-x")
    assert got == [] and seen


def _well_formed_metadata(info, number: int, workers: int) -> bool:
    """The spec of malformed_metadata, written out independently."""

    def number_like(x):
        return type(x) in (int, float) and math.isfinite(x)

    return (
        type(info) is dict
        and all(k in info for k in ("t", "w", "round", "rank"))
        and number_like(info["t"])
        and number_like(info["w"])
        and info["w"] >= 0
        and type(info["round"]) is int
        and info["round"] == number
        and type(info["rank"]) is int
        and 0 <= info["rank"] < workers
        and ("c" not in info or (type(info["c"]) is str and len(info["c"]) == 64))  # a start-state hash, if any
    )


@settings(max_examples=500, deadline=None, database=None)
@given(mutation=META_MUTATIONS, number=st.integers(1, 5), workers=st.integers(1, 4))
@example(mutation=KEEP_ALL, number=3, workers=2)
@example(mutation=("keys", {"t": ("set", math.nan), "w": ("keep",), "round": ("keep",), "rank": ("keep",)}, {}),
         number=3, workers=2)  # fmt: skip
@example(mutation=("keys", {"t": ("keep",), "w": ("set", True), "round": ("keep",), "rank": ("keep",)}, {}),
         number=3, workers=2)  # fmt: skip
@example(mutation=("keys", {"t": ("keep",), "w": ("keep",), "round": ("set", 3.0), "rank": ("keep",)}, {}),
         number=3, workers=2)  # fmt: skip
@example(mutation=("keys", {"t": ("keep",), "w": ("keep",), "round": ("keep",), "rank": ("set", 2**64 - 1)}, {}),
         number=3, workers=2)  # fmt: skip
@example(mutation=("keys", KEEP_ALL[1], {"c": "ab"}), number=3, workers=2)  # a commitment that is no hash
@example(mutation=("keys", KEEP_ALL[1], {"c": "0" * 64}), number=3, workers=2)  # one that is
def test_malformed_metadata_accepts_exactly_the_well_formed(mutation, number, workers):
    honest = {"t": 1.7e9, "w": 2.0, "round": number, "rank": workers - 1}
    info = _mutate_metadata(honest, mutation)
    why = malformed_metadata(info, number, workers)
    assert (why is None) == _well_formed_metadata(info, number, workers), (info, why)
    assert why is None or (isinstance(why, str) and why)


# ---------------------------------------------------------------------------------------------- real peers
def _keep_warnings(seen: list[str]) -> None:
    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(f"{record.levelname} {record.getMessage()}")

    logging.getLogger("locoswarm").addHandler(Keep(logging.WARNING))


def _peer_classes():
    """The test-only peers (built in the peer process: they subclass hivemind-backed classes)."""
    from locoswarm.comm.hivemind import HivemindAverager
    from locoswarm.comm.hivemind_gather import PayloadMailbox

    class LyingMailbox(PayloadMailbox):
        """Sends the fuzzed bytes of one stage instead of the real ones (and uses them itself where it would use
        its own: the all-gather's own row), exactly as a malicious groupmate's mailbox could."""

        owner = None

        def exchange(self, round_, redo, group, blob, deadline):
            fuzz = self.owner.fuzz
            if fuzz is not None and fuzz[0] == "gather":
                blob = self.owner.sent["gather"] = _mutate(blob, fuzz[1])
            return super().exchange(round_, redo, group, blob, deadline)

        def send_and_receive(self, round_, redo, stage, send, receive_from, deadline, partial=False):
            fuzz = self.owner.fuzz
            if fuzz is not None and fuzz[0] == stage and stage != "gather":
                send = {p: b if p == self.peer_id else _mutate(b, fuzz[1]) for p, b in send.items()}
                self.owner.sent[stage] = next(b for p, b in send.items() if p != self.peer_id)
            if fuzz is not None and fuzz[0] == "scatter" and stage == "reduced":
                deadline = min(deadline, time.monotonic() + 2.0)  # the receiver may have failed its round: no wait
            return super().send_and_receive(round_, redo, stage, send, receive_from, deadline, partial)

    class Liar(HivemindAverager):
        fuzz: tuple | None = None  # (stage | "metadata", mutation) for the next round

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.sent: dict = {}

        def _metadata(self, number, weight):
            meta = super()._metadata(number, weight)
            if self.fuzz is not None and self.fuzz[0] == "metadata":
                meta = _mutate_metadata(meta, self.fuzz[1])
            self.sent.update(metadata=meta, number=number)
            return meta

        def _mailbox_for(self):
            if self._mailbox is None:
                with self._dht_lock:
                    mailbox = LyingMailbox(self.dht, f"{self.cfg.run_id}_payloads")
                    mailbox.owner = self
                    self._mailbox = mailbox
            return self._mailbox

    class Donor(HivemindAverager):
        """Serves whatever state it is told to (``offer``) at once."""

        offer = None

        def _provide(self):
            if self.offer is None:
                raise RuntimeError("nothing to serve")
            return self.offer

    return HivemindAverager, Liar, Donor


class _Mailboxes:
    """Two PayloadMailboxes on two real DHTs: ``sender`` writes raw messages to ``receiver``."""

    SIZE, ROUND = 64, 7

    def __init__(self, run_id: str):
        from hivemind.dht import DHT

        from locoswarm.comm.hivemind_gather import PayloadMailbox

        self.dhts = [DHT(host_maddrs=["/ip4/127.0.0.1/tcp/0"], start=True)]
        self.dhts.append(DHT(initial_peers=self.dhts[0].get_visible_maddrs(), host_maddrs=["/ip4/127.0.0.1/tcp/0"],
                             start=True))  # fmt: skip
        self.name = f"{run_id}_payloads"
        self.receiver, self.sender = (PayloadMailbox(d, self.name) for d in self.dhts)
        self.receiver.expect(self.ROUND, self.SIZE)
        self.maddrs = [str(m) for m in self.dhts[0].get_visible_maddrs()]

    def raw(self, messages: list[tuple[bytes, bytes]]) -> dict:
        from hivemind.proto import averaging_pb2, runtime_pb2

        async def stream():
            for group_id, buffer in messages:
                part = runtime_pb2.Tensor(buffer=_part(buffer))
                yield averaging_pb2.AveragingData(group_id=group_id, tensor_part=part)

        from hivemind.p2p import P2PHandlerError

        p2p, peer = self.sender._p2p, self.receiver.peer_id
        call = p2p.call_protobuf_handler(peer, self.name, stream(), averaging_pb2.AveragingData)
        try:
            code = averaging_pb2.MessageCode.Name(self.sender._run(call, timeout=30).code)
        except P2PHandlerError as e:  # the receiver's handler raised
            code = f"handler failed: {e}"
        except Exception as e:  # noqa: BLE001 - the receiver hung up on a stream it refused before its end
            code = f"cut off: {type(e).__name__}"
        me = self.sender.peer_id.to_bytes()
        with self.receiver._cond:
            stored = {k[:3]: v for k, v in self.receiver._inbox.items() if k[3] == me}
            for k in [k for k in self.receiver._inbox if k[3] == me]:
                del self.receiver._inbox[k]
        return {"code": code, "stored": stored}

    def healthy(self) -> dict:
        """An honest all-gather between the two mailboxes still works."""
        import threading

        number, out = self.ROUND + 1, {}
        group = [self.receiver.peer_id, self.sender.peer_id]

        def run(i, box):
            out[i] = box.exchange(number, 0, group, f"payload {i}".encode(), deadline=time.monotonic() + 20)

        for box in (self.receiver, self.sender):
            box.expect(number, 16)
        threads = [threading.Thread(target=run, args=(i, b)) for i, b in enumerate((self.receiver, self.sender))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=30)
        return {i: {bytes(p.to_bytes()).hex(): v for p, v in got.items()} for i, got in out.items()}

    def close(self) -> None:
        for box in (self.receiver, self.sender):
            box.close()
        for d in self.dhts:
            d.shutdown()


def _part(buffer) -> bytes:
    """A message part: bytes, or ("big", n) for n bytes of 0x01 (so that hypothesis reports stay short)."""
    return b"\1" * buffer[1] if isinstance(buffer, tuple) else buffer


def _peer_main(index: int, role: str, run_id: str, opts: dict, initial: list, cmd_q, out_q) -> None:
    """One peer process: build the peer for ``role``, then serve commands until "stop"."""
    os.environ["OMP_NUM_THREADS"] = "1"
    mp.set_start_method("fork", force=True)  # hivemind forks its background processes, as in a swarm peer
    torch.set_num_threads(1)
    from locoswarm.config import AggregatorConfig, BackendConfig

    seen: list[str] = []
    _keep_warnings(seen)
    peer = None
    states: list = []  # what the receiver's set_state was called with
    try:
        Honest, Liar, Donor = _peer_classes()
        cfg = BackendConfig(name="hivemind", run_id=run_id, initial_peers=list(initial), **BACKEND)
        kw = dict(workers=2, seed=SEED, compression=_compression(opts.get("codec", "none")),
                  aggregator=AggregatorConfig(name=opts.get("aggregator", "mean")))  # fmt: skip
        if role == "mailboxes":
            peer = _Mailboxes(run_id)
        elif role in ("victim", "receiver"):
            peer = Honest(cfg, rank=0, **kw)
        elif role == "liar":
            peer = Liar(cfg, rank=1, **kw)
        elif role == "donor":
            peer = Donor(cfg, rank=1, **kw)
        if role == "donor":
            peer.attach_run_state(lambda: {}, lambda s: None)
        if role == "receiver":
            peer.attach_run_state(lambda: {}, states.append)
        out_q.put(("ready", peer.maddrs))
        while True:
            cmd = cmd_q.get(timeout=900)
            if cmd[0] == "stop":
                break
            mark, t0 = len(seen), time.monotonic()
            result: dict = {"error": None}
            try:
                if cmd[0] == "round":
                    rank = 0 if role == "victim" else 1
                    if role == "liar":
                        peer.fuzz, peer.sent = cmd[1], {}
                    peer._publish_progress()  # what round_boundary does: groupmates know we are alive
                    tensors = [t.unsqueeze(0) for t in _inputs(rank)]
                    out = peer.start(tensors, torch.tensor([WEIGHTS[rank]])).wait(timeout=ROUND_LIMIT)
                    result.update(tensors=[t.numpy().copy() for t in out.tensors], group=out.group_size,
                                  members=out.members, rejected=out.rejected, number=peer.round,
                                  sent=dict(getattr(peer, "sent", {})))  # fmt: skip
                elif cmd[0] == "offer":
                    meta, blob, wrap = cmd[1:]
                    tensor = (
                        torch.frombuffer(bytearray(blob), dtype=torch.uint8)
                        if blob
                        else torch.zeros(0, dtype=torch.uint8)
                    )
                    tensors = (
                        [tensor.view(torch.bfloat16)] if wrap == "bfloat16" else [tensor] if wrap == "uint8" else []
                    )
                    peer.offer = (meta, tensors)
                elif cmd[0] == "download":
                    del states[:]
                    result.update(ok=peer._download(min_round=0, timeout=cmd[1]), states=[_describe(s) for s in states])
                elif cmd[0] == "raw":
                    result.update(peer.raw(cmd[1]))
                elif cmd[0] == "healthy":
                    result.update(got=peer.healthy())
            except BaseException:  # noqa: BLE001 - whatever escapes is what the test looks for
                result["error"] = traceback.format_exc()
            result.update(log=seen[mark:], seconds=time.monotonic() - t0)
            out_q.put(("done", result))
    except BaseException:  # noqa: BLE001
        out_q.put(("failed", traceback.format_exc()))
    finally:
        if peer is not None:
            with contextlib.suppress(Exception):
                peer.close()


def _describe(state) -> object:
    """A loaded state, in a form that crosses a process boundary and compares by value."""
    if isinstance(state, dict):
        return {str(k): repr(v.tolist() if isinstance(v, torch.Tensor) else v) for k, v in state.items()}
    return f"not a dict: {type(state).__name__}"


class _Peers:
    """Peer processes (``roles``, the first one starts the DHT), each serving commands until the block ends; every
    process they started is gone afterwards."""

    def __init__(self, run_id: str, roles: list[str], **opts):
        self.run_id, self.roles, self.opts = run_id, roles, opts
        self.ctx = mp.get_context("spawn")
        self.procs: list = []
        self.cmd_qs: list = []
        self.out_qs: list = []

    def __enter__(self) -> _Peers:
        try:
            initial: list[str] = []
            for index, role in enumerate(self.roles):
                cmd_q, out_q = self.ctx.Queue(), self.ctx.Queue()
                proc = self.ctx.Process(target=_peer_main, args=(index, role, self.run_id, self.opts, initial, cmd_q,
                                                                  out_q), daemon=False)  # fmt: skip
                proc.start()
                self.procs.append(proc)
                self.cmd_qs.append(cmd_q)
                self.out_qs.append(out_q)
                kind, payload = self._get(index, timeout=180)
                assert kind == "ready", f"peer {index} ({role}) did not start:\n{payload}"
                initial = initial or payload
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def _get(self, index: int, timeout: float):
        try:
            return self.out_qs[index].get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"peer {index} ({self.roles[index]}) hung: no answer in {timeout:.0f}s") from None

    def send(self, index: int, *cmd) -> None:
        self.cmd_qs[index].put(cmd)

    def result(self, index: int, timeout: float = ROUND_LIMIT + 30) -> dict:
        kind, payload = self._get(index, timeout)
        assert kind == "done", f"peer {index} ({self.roles[index]}) died:\n{payload}"
        return payload

    def call(self, index: int, *cmd, timeout: float = ROUND_LIMIT + 30) -> dict:
        self.send(index, *cmd)
        return self.result(index, timeout)

    def round(self, fuzz) -> tuple[dict, dict]:
        """One real round: the honest peer (0) and the fuzzing one (1) start it together."""
        self.send(0, "round", None)
        self.send(1, "round", fuzz)
        return self.result(0), self.result(1)

    def __exit__(self, *exc) -> None:
        import psutil

        children = []
        for proc in self.procs:
            with contextlib.suppress(psutil.Error):
                children += psutil.Process(proc.pid).children(recursive=True)
        for q in self.cmd_qs:
            with contextlib.suppress(Exception):
                q.put(("stop",))
        for proc in self.procs:
            proc.join(timeout=30)
            if proc.is_alive():
                proc.kill()
                proc.join(timeout=10)
        gone, alive = psutil.wait_procs(children, timeout=10)
        for child in alive:  # a hivemind helper (DHT, averager, p2pd) left behind by a peer that did not close
            with contextlib.suppress(psutil.Error):
                child.kill()
        psutil.wait_procs(alive, timeout=10)


def _no_escape(res: dict, who: str = "the honest peer") -> None:
    assert res["error"] is None, f"an exception escaped {who}:\n{res['error']}"
    assert res["seconds"] < ROUND_LIMIT, f"{who} took {res['seconds']:.0f}s"


def _equal(got: list, expected: list[torch.Tensor]) -> bool:
    return all(torch.equal(torch.from_numpy(g), e) for g, e in zip(got, expected, strict=True))


@pytest.mark.network
@pytest.mark.slow
def test_fuzzed_allgather_payloads_reject_their_sender():
    """topk with aggregator=median (all-gathered): a payload that does not decode drops its sender (rank 1 in
    ``Round.rejected``, "malformed payload"), a non-finite one is screened out ("non-finite values"), any other is
    used; the honest peer's result is the sim's ``combine`` of the rows it accepted, bit for bit."""
    codecs = _codecs("topk")
    like = codecs.encode(_inputs(0))
    own = codecs.decode_row(LocalCodecs.pack(like), like)
    valid = LocalCodecs.pack(_codecs("topk").encode(_inputs(1)))
    with _Peers(f"fuzzgather{os.getpid()}", ["victim", "liar"], codec="topk", aggregator="median") as peers:
        mine, theirs = peers.round(("gather", ("keep",)))
        _no_escape(mine)
        assert mine["group"] == 2 and mine["rejected"] == {} and theirs["sent"]["gather"] == valid, (mine, theirs)

        @settings(max_examples=20, **NETWORK)
        @given(mutation=MUTATIONS)
        @example(mutation=("replace", bytes(range(256)) * 2))  # random bytes
        @example(mutation=("truncate", len(valid) - 1))  # truncated
        @example(mutation=("extend", b"\0"))  # extended: longer than the round allows
        @example(mutation=("flip", (8 * len(valid) - 2,)))  # a bit flip in the last value's exponent
        @example(mutation=("flip", (31,)))  # a bit flip in the first index: out of range
        def one_round(mutation):
            mine, theirs = peers.round(("gather", mutation))
            _no_escape(mine)
            sent = theirs["sent"].get("gather")
            assert sent == _mutate(valid, mutation), theirs
            try:
                row = codecs.decode_row(sent, like)
            except ValueError:
                expected, rejected = [own], {1: "malformed payload"}
            else:
                expected, rejected = [own, row], {}
            shares = SHARES if len(expected) == 2 else [1.0]
            mean, dropped = combine(Median(), expected, shares)
            rejected.update({j: why for j, why in dropped.items()})
            assert mine["group"] == 2 and mine["members"] == [0, 1], mine
            assert set(mine["rejected"]) == set(rejected), (mine["rejected"], rejected)
            for rank, why in rejected.items():
                assert mine["rejected"][rank].startswith(why), mine["rejected"]
                assert any(f"rank {rank}'s contribution rejected" in m for m in mine["log"]), mine["log"]
            assert _equal(mine["tensors"], mean), "the result is not the sim's combine of the accepted rows"

        one_round()


@pytest.mark.network
@pytest.mark.slow
def test_fuzzed_reduce_scatter_slices_and_chunks_never_crash_the_round():
    """int8 with aggregator=mean (re-quantising reduce-scatter, two owners). A fuzzed stage-1 slice for our chunk
    that does not decode rejects its sender from our chunk (a logged rejection, reported to the group); a fuzzed
    stage-2 reduced chunk (+ screening report) that does not decode fails our round (a zero update: a reduced chunk
    cannot be left out) with a logged rejection of its owner, never with an exception; whatever decodes is used, and
    the result is exactly what ``reduce_owned_screened(drop_malformed=True)`` / ``assemble`` make of the bytes we
    received."""
    mine_c, theirs_c = _codecs("int8"), _codecs("int8")
    like0, like1 = mine_c.encode(_inputs(0)), theirs_c.encode(_inputs(1))
    slices0, slices1 = mine_c.split(like0, 2), theirs_c.split(like1, 2)
    size1 = mine_c.chunk_sizes(like0, 2)[1]
    limit = len(LocalCodecs.pack(like0)) + REPORT_LIMIT

    def expected(stage: str, sent: bytes):
        """(mean, rejected) for the bytes the honest peer received, or None if its round must fail."""
        piece = sent if stage == "scatter" else slices1[0]
        try:
            reduced0, report0 = mine_c.reduce_owned_screened(0, 2, [slices0[0], piece], SHARES, like0,
                                                             drop_malformed=True)  # fmt: skip
            if stage == "reduced":
                blob = sent[: limit + 1]  # the mailbox reads no further
                reduced1, report1 = blob[:size1], _unpack_report(blob[size1:], 2, "owner 1")
            else:
                reduced1, _ = theirs_c.reduce_owned_screened(1, 2, [slices0[1], slices1[1]], SHARES, like1)
                report1 = []
            mean = mine_c.assemble([reduced0, reduced1], like0)
        except ValueError:
            return None
        return mean, merge_dropped([report0, report1])

    with _Peers(f"fuzzreduce{os.getpid()}", ["victim", "liar"], codec="int8", aggregator="mean") as peers:
        mine, theirs = peers.round(("scatter", ("keep",)))
        _no_escape(mine)
        assert mine["group"] == 2 and mine["rejected"] == {} and theirs["sent"]["scatter"] == slices1[0], mine

        @settings(max_examples=16, **NETWORK)
        @given(stage=st.sampled_from(["scatter", "reduced"]), mutation=MUTATIONS)
        @example(stage="scatter", mutation=("replace", b"\x80" * len(slices1[0])))  # code -128
        @example(stage="scatter", mutation=("truncate", 3))
        @example(stage="scatter", mutation=("extend", b"\1" * 8))
        @example(stage="reduced", mutation=("flip", (8 * size1 - 2,)))  # the last scale's exponent: an inf product
        @example(stage="reduced", mutation=("extend", b'[{"0": "you"}]'))  # a report accusing the receiver
        @example(stage="reduced", mutation=("extend", b"\xff{not json"))  # a malformed report
        def one_round(stage, mutation):
            mine, theirs = peers.round((stage, mutation))
            _no_escape(mine)
            sent = theirs["sent"].get(stage)
            assert sent is not None, theirs  # the fuzzing peer reached the stage
            want = expected(stage, sent)
            if want is None:  # only a reduced chunk can fail the round: it blames its owner (rank 1)
                assert stage == "reduced" and mine["group"] == 0, mine
                assert list(mine["rejected"]) == [1], mine
                assert mine["rejected"][1].startswith("malformed reduced chunk: "), mine
                assert all(not t.any() for t in mine["tensors"]), "a failed round must apply a zero update"
                assert any("failed (reduce of the payloads" in m for m in mine["log"]), mine["log"]
                assert any("rank 1's contribution rejected: malformed reduced chunk" in m for m in mine["log"])
            else:
                mean, rejected = want
                assert mine["group"] == 2, mine
                assert mine["rejected"] == {j: why for j, why in rejected.items()}, (mine["rejected"], rejected)
                assert _equal(mine["tensors"], mean), "the result is not what the received bytes give"
                assert all(bool(torch.isfinite(torch.from_numpy(t)).all()) for t in mine["tensors"]), "non-finite"
                if any(why.startswith("malformed slice") for why in rejected.values()):
                    assert stage == "scatter" and any("rank 1's contribution rejected: malformed slice" in m
                                                      for m in mine["log"]), mine["log"]  # fmt: skip
                if stage == "reduced" and _expected_report(sent[size1 : limit + 1], 2) is None:
                    assert any("malformed screening report" in m for m in mine["log"]), mine["log"]

        one_round()


class ReceiverFault(AssertionError):
    """The honest receiver misbehaved: it raised, handed set_state a non-dict, or lost its whole round to one
    groupmate's metadata (each was a bug in comm/hivemind.py, found by these tests)."""


def _topk_rows() -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The honest peer's and the fuzzing peer's decoded topk rows, as the honest peer decodes them."""
    codecs = _codecs("topk")
    like = codecs.encode(_inputs(0))
    own = codecs.decode_row(LocalCodecs.pack(like), like)
    return own, codecs.decode_row(LocalCodecs.pack(_codecs("topk").encode(_inputs(1))), like)


def _check_metadata_round(mine: dict, theirs: dict) -> None:
    """The honest peer's round, given the metadata the fuzzing peer really sent (topk, aggregator=median)."""
    own, theirs_row = _topk_rows()
    info, number = theirs["sent"]["metadata"], theirs["sent"]["number"]
    why = malformed_metadata(info, number, 2)
    if why is None:
        share = float(info["w"]) / (1.0 + float(info["w"]))
        mean, _ = combine(Median(), [own, theirs_row], [1.0 - share, share])
        assert mine["group"] == (2 if info["w"] > 0 else 1) and mine["rejected"] == {}, mine
    else:
        claimed = info.get("rank") if isinstance(info, dict) else None
        rank = claimed if _is_int(claimed) and claimed == 1 else -1
        mean = [own_t.clone() for own_t in own]
        assert mine["group"] == 1 and mine["members"] == [0], mine
        assert set(mine["rejected"]) == {rank}, (mine["rejected"], rank, info)
        reason = mine["rejected"][rank]
        assert "malformed round metadata" in reason and reason.endswith(why), (reason, why)
        assert any(f"rank {rank}'s contribution rejected" in m for m in mine["log"]), mine["log"]
    assert _equal(mine["tensors"], mean)


@pytest.mark.network
@pytest.mark.slow
def test_fuzzed_round_metadata_drops_its_sender():
    """The fuzzing peer's matchmaking metadata: any msgpack-able value (maps with string keys), keys missing or of
    the wrong type, huge or non-finite numbers. Malformed: it is dropped from the round (we average alone) and
    reported under the rank it claims if that is free, else -1, with ``malformed_metadata``'s reason. Well-formed:
    a normal round of two."""
    with _Peers(f"fuzzmeta{os.getpid()}", ["victim", "liar"], codec="topk", aggregator="median") as peers:
        mine, _ = peers.round(("metadata", KEEP_ALL))
        _no_escape(mine)
        assert mine["group"] == 2 and mine["rejected"] == {}, mine

        @settings(max_examples=20, **NETWORK)
        @given(mutation=META_MUTATIONS)
        @example(mutation=("keys", {**KEEP_ALL[1], "t": ("drop",)}, {}))  # missing key
        @example(mutation=("keys", {**KEEP_ALL[1], "w": ("set", math.nan)}, {}))  # NaN
        @example(mutation=("keys", {**KEEP_ALL[1], "round": ("set", 2**64 - 1)}, {}))  # a huge number
        @example(mutation=("keys", {**KEEP_ALL[1], "rank": ("set", "1")}, {}))  # a wrong type
        @example(mutation=("keys", {**KEEP_ALL[1], "rank": ("set", 0)}, {}))  # well-formed, the honest peer's rank
        @example(mutation=("whole", [1.5, None]))  # not a dict
        def one_round(mutation):
            mine, theirs = peers.round(("metadata", mutation))
            _no_escape(mine)
            _check_metadata_round(mine, theirs)

        one_round()


@pytest.mark.network
@pytest.mark.slow
def test_metadata_with_a_non_string_map_key_drops_only_its_sender():
    with _Peers(f"fuzzmetakeys{os.getpid()}", ["victim", "liar"], codec="topk", aggregator="median") as peers:
        mine, _ = peers.round(("metadata", KEEP_ALL))
        _no_escape(mine)
        assert mine["group"] == 2 and mine["rejected"] == {}, mine
        for extra in ({"t": {2: 3.0}}, {1: "an extra key"}):  # malformed (t is no number); well-formed (extra key)
            mine, theirs = peers.round(("metadata", ("keys", KEEP_ALL[1], extra)))
            _no_escape(mine)
            if mine["group"] == 0:
                raise ReceiverFault(f"one groupmate's metadata {extra} failed our whole round: {mine['log']}")
            _check_metadata_round(mine, theirs)


@pytest.mark.network
@pytest.mark.slow
def test_fuzzed_mailbox_messages_are_refused_or_kept_within_the_limit():
    """Raw messages into a real PayloadMailbox from a second real peer: any header, any number and size of parts.
    The handler never fails: an unparsable header is a protocol violation, a round we are not in is refused unread,
    a payload for our round is kept whole up to the limit and as a (limit + 1)-byte prefix beyond it (so it arrives,
    and fails the decoder's length check), and afterwards an honest exchange still works."""
    size, number = _Mailboxes.SIZE, _Mailboxes.ROUND
    headers = st.one_of(
        st.binary(max_size=24),
        st.builds(lambda r, d, s: f"{r}:{d}:{s}".encode(), st.sampled_from([number, number, number - 1, number + 1,
                  10**30, -1]), st.integers(-2, 3), st.sampled_from(["gather", "scatter", "reduced", "", "x:y"])),
        st.text(max_size=12).map(str.encode),
    )  # fmt: skip
    parts = st.lists(st.one_of(st.binary(max_size=40), st.integers(1 << 16, 1 << 20).map(lambda n: ("big", n))),
                     min_size=1, max_size=4)  # fmt: skip

    def oracle(group_id: bytes, buffers: list):
        try:
            r, d, s = group_id.decode().split(":")
            header = (int(r), int(d), s)
        except ValueError:
            return "PROTOCOL_VIOLATION", {}
        if header[0] != number:
            return "BAD_GROUP_ID", {}
        blob = b"".join(map(_part, buffers))
        if len(blob) > size:
            return "BAD_GROUP_ID", {header: blob[: size + 1]}
        return "ACCEPTED", {header: blob}

    with _Peers(f"fuzzmailbox{os.getpid()}", ["mailboxes"]) as peers:

        @settings(max_examples=60, **NETWORK)
        @given(group_id=headers, buffers=parts)
        @example(group_id=f"{number}:0:gather".encode(), buffers=[b"x" * size])
        @example(group_id=f"{number}:0:gather".encode(), buffers=[b"x" * size, b"y"])
        @example(group_id=f"{number + 1}:0:gather".encode(), buffers=[b"x"])
        @example(group_id=b"\xff:0:gather", buffers=[b"x"])
        def one_message(group_id, buffers):
            res = peers.call(0, "raw", [(group_id, buffers[0]), *((b"", b) for b in buffers[1:])], timeout=60)
            assert res["error"] is None, res["error"]
            code, stored = oracle(group_id, buffers)
            assert res["stored"] == stored, (group_id, res["code"])
            # a stream the receiver refuses before its end may reach the sender as a broken pipe instead of the code;
            # a handler that raised never may
            assert res["code"] == code or (code != "ACCEPTED" and res["code"].startswith("cut off")), res["code"]

        one_message()
        res = peers.call(0, "healthy", timeout=60)
        assert res["error"] is None, res["error"]
        assert sorted(map(sorted, (v.values() for v in res["got"].values()))) == [[b"payload 0", b"payload 1"]] * 2


def _state_blob(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


class _Unsafe:
    def __reduce__(self):
        return (print, ("a state blob ran code",))


VALID_STATE = {"params": torch.arange(6, dtype=torch.float32), "step": 3}
BLOBS = st.one_of(
    st.binary(max_size=300),
    st.sampled_from([torch.ones(3), [1, 2], 42, "state", None, (1, 2), [VALID_STATE]]).map(_state_blob),
    st.just(_state_blob(VALID_STATE)),
    MUTATIONS.map(lambda m: _mutate(_state_blob(VALID_STATE), m)),
    st.just(pickle.dumps(_Unsafe(), protocol=2)),
)
STATE_META = st.one_of(
    st.fixed_dictionaries({"round": st.integers(0, 3), "in_sync": st.just(True), "rank": st.just(1), "t": st.floats()}),
    st.fixed_dictionaries({"round": VALUES, "in_sync": VALUES, "rank": VALUES}),
    VALUES,
)


def _loads(blob: bytes):
    try:
        return torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - anything torch.load raises means: not a state
        return e


@pytest.mark.network
@pytest.mark.slow
def test_a_fuzzed_state_blob_is_refused_not_loaded():
    """A donor serving a malformed run state (``_download``, the join and resync path): random bytes, a torch.save of
    something that is not a state dict, a corrupted valid one, a pickle that would run code, junk metadata. The
    receiver never raises and never hands set_state anything but a dict; a well-formed state is loaded as sent."""
    with _Peers(f"fuzzstate{os.getpid()}", ["donor", "receiver"]) as peers:
        valid = _state_blob(VALID_STATE)
        assert peers.call(0, "offer", {"round": 1, "in_sync": True, "rank": 1}, valid, "uint8")["error"] is None
        res = peers.call(1, "download", 10.0)
        assert res["error"] is None and res["ok"] and res["states"] == [_describe(VALID_STATE)], res

        @settings(max_examples=15, **NETWORK)
        @given(meta=STATE_META, blob=BLOBS, wrap=st.sampled_from(["uint8", "uint8", "bfloat16", "none"]))
        @example(meta={"round": 2, "in_sync": True}, blob=b"\0garbage", wrap="uint8")  # random bytes
        @example(meta={"round": 2, "in_sync": True}, blob=_state_blob([1, 2]), wrap="uint8")  # not a state dict
        @example(meta={"round": 2, "in_sync": True}, blob=pickle.dumps(_Unsafe(), protocol=2), wrap="uint8")
        @example(meta={"round": math.nan, "in_sync": True}, blob=valid, wrap="uint8")
        @example(meta={"round": 2, "in_sync": True}, blob=valid, wrap="bfloat16")
        def one_download(meta, blob, wrap):
            wrap = wrap if len(blob) % 2 == 0 or wrap != "bfloat16" else "uint8"
            assert peers.call(0, "offer", meta, blob, wrap)["error"] is None
            res = peers.call(1, "download", 2.0)
            if res["error"] is not None:
                raise ReceiverFault(f"the receiver raised on a malformed state:\n{res['error']}")
            if not all(isinstance(s, dict) for s in res["states"]):
                raise ReceiverFault(f"set_state got {res['states']}")
            loaded = _loads(blob)
            if not isinstance(loaded, dict) or wrap != "uint8":
                assert not res["ok"] and res["states"] == [], res
            elif isinstance(meta, dict) and meta.get("in_sync") is True and _is_int(meta.get("round")):
                assert res["ok"] and res["states"] == [_describe(loaded)], res

        one_download()
