"""Compressed exchange on a real network: what a peer sends for its codec, and how the group's payloads become
the weighted mean. Shared by ``backend=torch`` and ``backend=hivemind`` (one worker per process).

There are three ways, and the codec decides (``Codec.summable``, ``Codec.reducible``):

- **all-reduce the wire buffer** (summable codecs: ``none``, ``fp16``, ``bf16``, ``randomk``). A payload is one
  ``values`` buffer that is linear in the input, and peers of one round agree on the rest (random-k's indices come
  from the shared seed and the round number, which every peer aligns to). Each peer encodes, the backend sums
  ``share x values`` across the group (a bandwidth-optimal all-reduce of only the wire bytes: random-k sends its
  k values and never an index), and everyone decodes the sum once.
- **re-quantising reduce-scatter** (reducible codecs: ``int8``, ``int4``, ``sign``, ``blocktopk``; every codec that
  encodes fixed-size blocks one by one). Their payloads carry per-peer scales, signs or kept positions, so they
  cannot be summed, but they cut into chunks of whole blocks whose payloads are slices of the whole one. The flattened tensor's blocks are split evenly over the group's n members in rank
  order (``owner_blocks``); each peer sends owner j its payload's slice for chunk j; owner j decodes the n
  slices, sums ``share x decode`` in rank order (fp32), re-encodes that mean with the codec (``requantizer``:
  no error feedback, the owner has no residual of it) and sends it to everyone, who decode and concatenate.
  So the group mean is quantised (sign, blocktopk: sparsified) twice, like hivemind's compressed butterfly, and
  each peer sends (n-1)/n + (n-1)/n of a payload, as an all-reduce does: for the sparsifiers that is what keeps
  their bytes per peer from growing with the group (topk's all-gather moves n-1 payloads). The ``sim`` backend runs these same functions on the
  same chunks, so real backends match it bit for bit.
- **all-gather the payloads** (every other codec: ``topk``, ``powersgd``, and ``int4`` or ``sign`` with a block
  size that splits a byte). Their payloads carry per-peer indices over the whole tensor or low-rank factors, so
  they can be neither summed nor re-encoded per chunk. Each peer sends its whole payload to every groupmate, and every peer decodes all
  of them and sums ``share x decode`` in rank order: exactly the ``sim`` backend's arithmetic, so the result
  matches it bit for bit. It costs (n-1) payloads each way instead of the all-reduce's 2(n-1)/n, which is why
  ``NetworkModel`` prices these codecs as an all-gather too, and why it stops paying off as groups grow.

A group of one sends nothing: every way returns the peer's own decoded payload.

Error feedback and PowerSGD's warm start live in this process's codecs (one per tensor), so they are checkpointed
with the averager's ``state_dict``; nothing of them crosses the wire.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch

from locoswarm.comm.aggregate import Aggregator, WeightedMean, combine
from locoswarm.compression import Codec, Payload, codec_factory
from locoswarm.compression.error_feedback import ErrorFeedback

_MEAN = WeightedMean()


class BadChunk(ValueError):
    """A reduced chunk that cannot be used (``LocalCodecs.assemble``); ``owner``: the index of the member that sent it."""

    def __init__(self, owner: int, why: str):
        super().__init__(why)
        self.owner = owner


def allgather_bytes(group: int, payload_bytes: float) -> float:
    """Bytes one peer sends (and receives) to all-gather a payload of ``payload_bytes`` in a group of ``group``."""
    return max(0, group - 1) * float(payload_bytes)


# ---------------------------------------------------------------------- re-quantising reduce-scatter (reducible)
def owner_blocks(blocks: int, owners: int) -> list[tuple[int, int]]:
    """Blocks [lo, hi) of a tensor that each of ``owners`` group members reduces, in rank order (even split)."""
    return [(j * blocks // owners, (j + 1) * blocks // owners) for j in range(owners)]


def chunk_payloads(codec: Codec, payload: Payload, owners: int) -> list[Payload]:
    """One tensor's payload cut into the slices for each owner (views, no copy)."""
    return [codec.slice_blocks(payload, lo, hi) for lo, hi in owner_blocks(codec.block_count(payload.shape), owners)]


def reduce_chunk(
    requantizer: Codec, pieces: Sequence[Payload], shares: Sequence[float], max_norm_ratio: float | None = None
) -> tuple[Payload, dict[int, str]]:
    """An owner's work: sum_j shares[j] * decode(pieces[j]) in the order given, re-encoded with ``requantizer``,
    after screening the pieces (comm/aggregate.py). Returns (payload, dropped piece index -> reason)."""
    return reduce_decoded(requantizer, [requantizer.decode(piece) for piece in pieces], shares, max_norm_ratio)


def reduce_decoded(
    requantizer: Codec, decoded: Sequence[torch.Tensor], shares: Sequence[float], max_norm_ratio: float | None = None
) -> tuple[Payload, dict[int, str]]:
    """``reduce_chunk`` of pieces already decoded."""
    if not decoded:
        raise ValueError("reduce_chunk needs at least one piece")
    (mean,), dropped = combine(_MEAN, [[t] for t in decoded], shares, max_norm_ratio)
    return requantizer.encode(mean), dropped


def assemble_chunks(codec: Codec, like: Payload, reduced: Sequence[Payload]) -> torch.Tensor:
    """Every owner's reduced chunk of one tensor, decoded and put back in place (shape and dtype of ``like``)."""
    requantizer = codec.requantizer()
    parts = [requantizer.decode(piece) for piece in reduced]
    flat = torch.cat(parts) if parts else torch.empty(0, dtype=like.dtype)
    return flat.reshape(like.shape)


class LocalCodecs:
    """The codecs of one worker for one stream of rounds (``key``), one per tensor, built lazily with the run's
    shared seeds."""

    def __init__(self, compression_cfg, run_seed: int, key: str = "all"):
        self._factory = codec_factory(compression_cfg, run_seed)
        self.key = key
        self._codecs: list[Codec] = []

    def codecs(self, count: int) -> list[Codec]:
        while len(self._codecs) < count:
            self._codecs.append(self._factory(self.key, len(self._codecs)))
        return self._codecs[:count]

    @property
    def summable(self) -> bool:
        return all(c.summable for c in self.codecs(max(1, len(self._codecs))))

    def encode(self, tensors: Sequence[torch.Tensor], round_: int | None = None) -> list[Payload]:
        """One payload per tensor; ``round_`` aligns shared randomness (random-k) with the group's round."""
        codecs = self.codecs(len(tensors))
        if round_ is not None:
            for c in codecs:
                c.align_round(round_)
        return [c.encode(t) for c, t in zip(codecs, tensors, strict=True)]

    # ------------------------------------------------------------------ summable codecs: all-reduce the wire buffer
    @staticmethod
    def wire_dtype(payloads: Sequence[Payload]) -> torch.dtype:
        """The (common) wire dtype of the payloads' ``values`` buffers, without building ``wire_values``."""
        dtypes = {p.buffers["values"].dtype for p in payloads}
        if len(dtypes) != 1:
            raise ValueError(f"summable payloads of one worker must share a wire dtype, got {sorted(map(str, dtypes))}")
        return dtypes.pop()

    def wire_values(self, payloads: Sequence[Payload]) -> torch.Tensor:
        """The payloads' ``values`` buffers as one flat tensor in their (common) wire dtype."""
        self.wire_dtype(payloads)
        return torch.cat([p.buffers["values"].reshape(-1) for p in payloads])

    def decode_values(self, summed: torch.Tensor, payloads: Sequence[Payload]) -> list[torch.Tensor]:
        """Decode the group's summed (or averaged) wire buffer, split back per tensor like ``payloads``."""
        out, offset = [], 0
        for codec, p in zip(self.codecs(len(payloads)), payloads, strict=True):
            n = p.buffers["values"].numel()
            values = summed[offset : offset + n].to(p.buffers["values"].dtype).reshape(p.buffers["values"].shape)
            out.append(codec.decode(Payload({"values": values}, p.shape, p.dtype, dict(p.meta))))
            offset += n
        return out

    # ------------------------------------------------------------------ reducible codecs: reduce-scatter, gather
    @property
    def reducible(self) -> bool:
        return all(c.reducible for c in self.codecs(max(1, len(self._codecs))))

    def split(self, payloads: Sequence[Payload], owners: int) -> list[bytes]:
        """The wire bytes this worker sends each owner in stage 1: its slice of every tensor, in tensor order."""
        per_tensor = [chunk_payloads(c, p, owners) for c, p in zip(self.codecs(len(payloads)), payloads, strict=True)]
        return [b"".join(pieces[j].to_bytes() for pieces in per_tensor) for j in range(owners)]

    def chunk_sizes(self, like: Sequence[Payload], owners: int) -> list[int]:
        """Bytes of owner j's chunk (the same in both stages: the reduced chunk has the slice's layout)."""
        sizes = [0] * owners
        for codec, p in zip(self.codecs(len(like)), like, strict=True):
            for j, (lo, hi) in enumerate(owner_blocks(codec.block_count(p.shape), owners)):
                start, stop = codec.block_entries(p.shape, lo, hi)
                sizes[j] += codec.wire_nbytes((stop - start,), p.dtype)
        return sizes

    def _pieces(self, blob: bytes, j: int, owners: int, like: Sequence[Payload]) -> list[Payload]:
        """Owner j's chunk of every tensor, rebuilt from ``blob`` (length-checked; ``decode`` checks the rest)."""
        expected = self.chunk_sizes(like, owners)[j]
        if len(blob) != expected:
            raise ValueError(f"chunk {j} of {owners} has {len(blob)} bytes, expected {expected}")
        view, offset, pieces = memoryview(blob), 0, []
        for codec, p in zip(self.codecs(len(like)), like, strict=True):
            lo, hi = owner_blocks(codec.block_count(p.shape), owners)[j]
            start, stop = codec.block_entries(p.shape, lo, hi)
            size = codec.wire_nbytes((stop - start,), p.dtype)
            pieces.append(
                codec.requantizer().payload_from_bytes(
                    view[offset : offset + size], (stop - start,), p.dtype, device=_device(p), meta={}
                )
            )
            offset += size
        return pieces

    def reduce_owned(
        self, j: int, owners: int, blobs: Sequence[bytes], shares: Sequence[float], like: Sequence[Payload]
    ) -> bytes:
        """Owner j's stage 2: the group's slices of chunk j (one blob per member, in rank order) -> the chunk's
        re-encoded weighted mean, as wire bytes. A malformed blob raises ``ValueError`` before any work."""
        return self.reduce_owned_screened(j, owners, blobs, shares, like)[0]

    def reduce_owned_screened(
        self,
        j: int,
        owners: int,
        blobs: Sequence[bytes],
        shares: Sequence[float],
        like: Sequence[Payload],
        max_norm_ratio: float | None = None,
        drop_malformed: bool = False,
    ) -> tuple[bytes, list[dict[int, str]]]:
        """``reduce_owned``, screening each tensor's pieces (comm/aggregate.py) as the sim does. Returns (wire
        bytes, per tensor: dropped member index -> reason); ``merge_dropped`` combines the owners' reports in the
        sim's order.

        ``drop_malformed`` (untrusted groupmates, backend=hivemind): a blob that does not parse drops its sender
        from this chunk, reported like a screened piece (every member learns it from this owner's report), and the
        others' shares are renormalised as ``combine`` does for a screened row; else it raises ``ValueError``.
        The owner's own blob must parse: it made it."""
        requantizers = [c.requantizer() for c in self.codecs(len(like))]
        per_peer: dict[int, list[torch.Tensor]] = {}  # member -> its decoded piece of every tensor
        malformed: dict[int, str] = {}
        for m, blob in enumerate(blobs):
            try:
                pieces = self._pieces(blob, j, owners, like)
                per_peer[m] = [q.decode(p) for q, p in zip(requantizers, pieces, strict=True)]
            except ValueError as e:
                if not drop_malformed or m == j:
                    raise
                malformed[m] = f"malformed slice: {e}"
        kept = sorted(per_peer)
        total = sum(shares[m] for m in kept)
        if not malformed:
            kept_shares = [shares[m] for m in kept]  # exactly the sim's arithmetic: no renormalisation
        elif not total > 0:
            raise ValueError(f"chunk {j}: no well-formed slice with a positive share ({malformed})")
        else:
            kept_shares = [shares[m] / total for m in kept]
        parts, dropped = [], []
        for i, q in enumerate(requantizers):
            payload, why = reduce_decoded(q, [per_peer[m][i] for m in kept], kept_shares, max_norm_ratio)
            parts.append(payload.to_bytes())
            dropped.append({**{kept[k]: reason for k, reason in why.items()}, **malformed})
        return b"".join(parts), dropped

    def assemble(self, reduced: Sequence[bytes], like: Sequence[Payload]) -> list[torch.Tensor]:
        """Every owner's reduced chunk (in rank order) -> the group mean of every tensor. A chunk that is malformed,
        or that decodes to inf or NaN (finite scales whose products overflow: an owner re-encodes a screened, finite
        mean, so it never sends one), raises ``BadChunk`` (a ``ValueError``) naming its owner: nobody screens the
        reduced chunks."""
        owners = len(reduced)
        per_owner = []
        for j, blob in enumerate(reduced):
            try:
                per_owner.append(self._pieces(blob, j, owners, like))
            except ValueError as e:
                raise BadChunk(j, str(e)) from e
        codecs = self.codecs(len(like))
        out = []
        for i, p in enumerate(like):
            try:
                out.append(assemble_chunks(codecs[i], p, [pieces[i] for pieces in per_owner]))
            except ValueError as e:  # a piece the codec's decode refuses (e.g. a NaN scale): find its owner
                for j, pieces in enumerate(per_owner):
                    try:
                        codecs[i].requantizer().decode(pieces[i])
                    except ValueError:
                        raise BadChunk(j, f"owner {j}'s reduced chunk of tensor {i}: {e}") from e
                raise
        for i, (codec, p, t) in enumerate(zip(codecs, like, out, strict=True)):
            bad = (~torch.isfinite(t.reshape(-1))).nonzero()
            if bad.numel():
                first = int(bad[0])
                blocks = owner_blocks(codec.block_count(p.shape), owners)
                j = next(j for j, (lo, hi) in enumerate(blocks) if first < codec.block_entries(p.shape, lo, hi)[1])
                raise BadChunk(j, f"owner {j}'s reduced chunk of tensor {i} decodes to non-finite values")
        return out

    # ------------------------------------------------------------------ other codecs: all-gather whole payloads
    @staticmethod
    def pack(payloads: Sequence[Payload]) -> bytes:
        """This worker's wire bytes for a round: every tensor's payload, in tensor order."""
        return b"".join(p.to_bytes() for p in payloads)

    def packed_size(self, tensors: Sequence[torch.Tensor]) -> int:
        codecs = self.codecs(len(tensors))
        return sum(c.wire_nbytes(tuple(t.shape), t.dtype) for c, t in zip(codecs, tensors, strict=True))

    def decode_mean(
        self, blobs: Sequence[bytes], shares: Sequence[float], like: Sequence[Payload]
    ) -> list[torch.Tensor]:
        """sum_j shares[j] * decode(blobs[j]), per tensor, accumulated in the order given (the sim's arithmetic)."""
        return self.decode_combine(blobs, shares, like)[0]

    def decode_combine(
        self,
        blobs: Sequence[bytes],
        shares: Sequence[float],
        like: Sequence[Payload],
        aggregator: Aggregator = _MEAN,
        max_norm_ratio: float | None = None,
    ) -> tuple[list[torch.Tensor], dict[int, str]]:
        """Decode every blob, screen and aggregate them (comm/aggregate.py: the sim's arithmetic). Returns (result,
        dropped blob index -> reason).

        ``like``: this worker's own payloads of the round (shapes, dtypes and the agreed meta). A blob of the
        wrong length or that fails a codec's checks raises ``ValueError`` before anything is accumulated."""
        rows = []
        for j, blob in enumerate(blobs):
            try:
                rows.append(self.decode_row(blob, like))
            except ValueError as e:
                raise ValueError(f"peer {j}'s payload: {e}") from e
        return combine(aggregator, rows, shares, max_norm_ratio)

    def decode_row(self, blob: bytes, like: Sequence[Payload]) -> list[torch.Tensor]:
        """One peer's packed payload (``pack``) decoded, per tensor. ``like``: this worker's own payloads of the
        round (shapes, dtypes and the agreed meta). A blob of the wrong length or that fails a codec's checks
        raises ``ValueError``."""
        codecs = self.codecs(len(like))
        sizes = [c.wire_nbytes(p.shape, p.dtype) for c, p in zip(codecs, like, strict=True)]
        if len(blob) != sum(sizes):
            raise ValueError(f"{len(blob)} bytes, expected {sum(sizes)}")
        view, offset, tensors = memoryview(blob), 0, []
        for codec, p, size in zip(codecs, like, sizes, strict=True):
            payload = codec.payload_from_bytes(
                view[offset : offset + size], p.shape, p.dtype, device=_device(p), meta=dict(p.meta)
            )
            tensors.append(codec.decode(payload))
            offset += size
        return tensors

    # ------------------------------------------------------------------ rolling a failed round's encode back
    def snapshot(self, count: int) -> list[Codec]:
        """A deep copy of the first ``count`` codecs (error-feedback residuals, PowerSGD's warm start), taken
        before an encode so that a round which then fails can be undone (``restore``)."""
        return copy.deepcopy(self.codecs(count))

    def restore(self, snapshot: Sequence[Codec]) -> None:
        """Put the codecs back as ``snapshot`` holds them (it is consumed: the codecs become those objects)."""
        self._codecs[: len(snapshot)] = list(snapshot)

    def residuals(self, count: int | None = None) -> list[torch.Tensor | None]:
        """The error-feedback residual of each codec (None: none yet, or not an error-feedback codec)."""
        return residuals(self._codecs if count is None else self.codecs(count))

    def state_dict(self) -> dict:
        return {"codecs": list(self._codecs)}

    def load_state_dict(self, state: dict) -> None:
        self._codecs = list(state["codecs"])


def residuals(codecs: Sequence[Codec]) -> list[torch.Tensor | None]:
    """Each codec's error-feedback residual (None where it has none)."""
    return [c.residual if isinstance(c, ErrorFeedback) else None for c in codecs]


def merge_dropped(per_owner: Sequence[Sequence[dict[int, str]]]) -> dict[int, str]:
    """The owners' screening reports (per owner, per tensor: member index -> reason) as one dict, merged tensor by
    tensor and owner by owner: the order in which the sim screens the same chunks, so the same reason wins. A report
    may be shorter than the others (a groupmate's report is untrusted; a malformed one reads as empty)."""
    out: dict[int, str] = {}
    for i in range(max((len(t) for t in per_owner), default=0)):
        for tensors in per_owner:
            if i < len(tensors):
                out.update(tensors[i])
    return out


def _device(payload: Payload) -> torch.device:
    return next(iter(payload.buffers.values())).device if payload.buffers else torch.device("cpu")
