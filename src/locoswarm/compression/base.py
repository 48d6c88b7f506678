"""The codec contract: what a pseudo-gradient looks like on the wire.

A ``Codec`` turns one tensor into a ``Payload`` (``encode``) and back (``decode``). ``payload.nbytes`` is
exactly the number of bytes that would cross the network: ``len(payload.to_bytes())``. Shape and dtype are
agreed by both ends from the parameter they belong to, so they are not part of the wire format.

The wire format of a payload is its buffers' raw bytes (native byte order, i.e. little-endian on every
platform torch supports), concatenated in key order. ``Codec.layout(shape, dtype)`` says which buffers a
payload for that tensor holds (key, dtype, element count), so a receiver can rebuild the payload from the raw
bytes alone with ``Codec.payload_from_bytes``; ``Codec.wire_nbytes`` prices a tensor without encoding it.

Codecs may keep state between rounds (error feedback residuals, PowerSGD's warm-started factor, the shared
random-k index stream), so an averager holds one codec instance per (local worker, tensor); build them with
``make_codec``. ``decode`` never changes a codec's state, and a malformed payload raises ``ValueError``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import torch

# One wire buffer: (key, dtype, number of elements).
BufferSpec = tuple[str, torch.dtype, int]


@dataclass
class Payload:
    """An encoded tensor: named raw buffers plus the (shape, dtype) of the tensor it decodes to."""

    buffers: dict[str, torch.Tensor]
    shape: tuple[int, ...]
    dtype: torch.dtype
    meta: dict = field(default_factory=dict)  # small, agreed-by-both-ends facts (e.g. a shared seed); not sent

    @property
    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers.values())

    def to_bytes(self) -> bytes:
        """The wire format: the buffers' raw bytes, concatenated in key order."""
        return b"".join(
            self.buffers[k].detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy().tobytes()
            for k in sorted(self.buffers)
        )


def compression_ratio(payload: Payload) -> float:
    """Achieved compression: wire bytes / the bytes of the same tensor in fp32 (1.0 for an empty tensor)."""
    n = numel(payload.shape)
    if n == 0:
        return 1.0
    return payload.nbytes / (n * 4)


class Codec(ABC):
    """Encode/decode one tensor. ``lossless`` codecs promise decode(encode(t)) == t exactly."""

    name: str = "codec"
    lossless: bool = False
    # Summable: a payload is one ``values`` buffer, decode is linear in it, and peers that encoded the same round
    # agree on everything else (the shape; random-k's indices). Then summing peers' ``values`` (pre-scaled by
    # their shares) and decoding once equals the weighted mean of their decodes, so a real backend may all-reduce
    # the wire buffer itself; other codecs' payloads must be all-gathered and decoded one by one.
    summable: bool = False
    # Reducible: the payload cuts into chunks of whole blocks, and a chunk's payload is the matching slice of the
    # whole payload (``slice_blocks``): blockwise quantisers. A group then averages them with a re-quantising
    # reduce-scatter (comm/exchange.py): the owner of each chunk decodes everyone's slice, takes the weighted mean
    # and re-encodes it with ``requantizer()`` for everyone, which moves 2(n-1)/n payloads like an all-reduce
    # instead of the all-gather's n-1.
    reducible: bool = False

    @abstractmethod
    def encode(self, tensor: torch.Tensor) -> Payload: ...

    @abstractmethod
    def decode(self, payload: Payload) -> torch.Tensor: ...

    @abstractmethod
    def layout(self, shape: tuple[int, ...], dtype: torch.dtype) -> list[BufferSpec]:
        """The buffers a payload for a tensor of this shape and dtype carries: (key, dtype, numel) each."""

    def wire_nbytes(self, shape: tuple[int, ...], dtype: torch.dtype) -> int:
        """Bytes on the wire for one tensor of this shape and dtype (no encoding needed)."""
        return sum(numel_ * _itemsize(dt) for _, dt, numel_ in self.layout(_shape(shape), dtype))

    def block_count(self, shape: tuple[int, ...]) -> int:
        """Reducible codecs: the number of blocks a tensor of this shape is cut into."""
        raise NotImplementedError(f"{self.name}: payloads do not split into blocks (reducible is False)")

    def slice_blocks(self, payload: Payload, lo: int, hi: int) -> Payload:
        """Reducible codecs: the payload of blocks [lo, hi) of the flattened tensor, as a 1-D tensor's payload
        (a view into ``payload``'s buffers, not a copy)."""
        raise NotImplementedError(f"{self.name}: payloads do not split into blocks (reducible is False)")

    def block_entries(self, shape: tuple[int, ...], lo: int, hi: int) -> tuple[int, int]:
        """Reducible codecs: the flat entry range [start, stop) that blocks [lo, hi) cover."""
        raise NotImplementedError(f"{self.name}: payloads do not split into blocks (reducible is False)")

    def requantizer(self) -> Codec:
        """Reducible codecs: a stateless codec of the same wire format that re-encodes a chunk's group mean."""
        raise NotImplementedError(f"{self.name}: payloads do not split into blocks (reducible is False)")

    def align_round(self, round_: int) -> None:  # noqa: B027 - only shared-randomness codecs need it
        """Use round ``round_``'s shared randomness for the next encode (random-k's indices). Peers of a real swarm
        call it with the round they agreed on, so one that skipped rounds still picks the group's indices."""

    def wire_meta(self) -> dict:
        """The agreed-by-both-ends meta of this codec's latest encode (what a received payload needs too)."""
        return {}

    def payload_from_bytes(
        self,
        buf: bytes | bytearray | memoryview,
        shape: tuple[int, ...],
        dtype: torch.dtype,
        *,
        device: torch.device | str | None = None,
        meta: dict | None = None,
    ) -> Payload:
        """Rebuild a payload from its wire bytes (``Payload.to_bytes``) and the agreed shape and dtype.

        ``meta`` defaults to this codec's ``wire_meta()``: a peer that encoded the same tensor this round
        agrees on it (e.g. the random-k round). Only the length is checked here; ``decode`` checks the rest.
        """
        shape = _shape(shape)
        specs = sorted(self.layout(shape, dtype))
        raw = bytes(buf)
        expected = sum(n * _itemsize(dt) for _, dt, n in specs)
        if len(raw) != expected:
            raise ValueError(
                f"{self.name}: wire buffer has {len(raw)} bytes, expected {expected} for shape {shape} {dtype}"
            )
        flat = torch.frombuffer(bytearray(raw), dtype=torch.uint8) if raw else torch.empty(0, dtype=torch.uint8)
        buffers: dict[str, torch.Tensor] = {}
        offset = 0
        for key, dt, n in specs:
            size = n * _itemsize(dt)
            # clone: a fresh, aligned storage per buffer, so .view(dtype) is always legal
            buffers[key] = flat[offset : offset + size].clone().view(dt).to(device or "cpu")
            offset += size
        return Payload(buffers, shape, dtype, dict(self.wire_meta() if meta is None else meta))

    def check_payload(self, payload: Payload) -> None:
        """Raise ``ValueError`` unless the payload's buffers are exactly ``layout(shape, dtype)``."""
        shape = _shape(payload.shape)
        specs = {key: (dt, n) for key, dt, n in self.layout(shape, payload.dtype)}
        if set(payload.buffers) != set(specs):
            raise ValueError(
                f"{self.name}: payload has buffers {sorted(payload.buffers)}, expected {sorted(specs)} for {shape}"
            )
        for key, (dt, n) in specs.items():
            b = payload.buffers[key]
            if b.dtype != dt or b.numel() != n:
                raise ValueError(
                    f"{self.name}: buffer {key!r} is {b.numel()} x {b.dtype}, expected {n} x {dt} "
                    f"for shape {shape} {payload.dtype}"
                )


class BlockwiseCodec(Codec):
    """A codec that encodes fixed blocks of ``block_size`` entries of the flattened tensor one by one (the last
    block may be shorter): the block arithmetic of ``Codec.reducible`` codecs whose chunks are runs of blocks."""

    block_size: int

    def block_count(self, shape: tuple[int, ...]) -> int:
        return -(-numel(shape) // self.block_size)

    def block_entries(self, shape: tuple[int, ...], lo: int, hi: int) -> tuple[int, int]:
        n = numel(shape)
        return min(lo * self.block_size, n), min(hi * self.block_size, n)

    def chunk_entries(self, payload: Payload, lo: int, hi: int) -> tuple[int, int]:
        """``block_entries`` of blocks [lo, hi) of ``payload``, after checking they are its blocks."""
        if not 0 <= lo <= hi <= self.block_count(payload.shape):
            raise ValueError(
                f"{self.name}: blocks [{lo}, {hi}) are outside the payload's {self.block_count(payload.shape)}"
            )
        return self.block_entries(payload.shape, lo, hi)

    def requantizer(self) -> Codec:
        return self  # stateless: the blockwise codecs keep nothing between encodes


class NoCompression(Codec):
    """fp32 (or the tensor's own dtype) as is: the baseline every compression ratio is measured against."""

    name = "none"
    lossless = True
    summable = True
    # Also reducible, with blocks of one entry: summable wins where the sum can go on the wire (comm/aggregate.py),
    # but backend=hivemind with backend.allreduce=mailbox averages fp32 by locoswarm's reduce-scatter instead of
    # hivemind's butterfly; re-encoding a chunk's mean is the identity, so that is the sim's arithmetic exactly.
    reducible = True

    def block_count(self, shape: tuple[int, ...]) -> int:
        return numel(shape)

    def block_entries(self, shape: tuple[int, ...], lo: int, hi: int) -> tuple[int, int]:
        return lo, hi

    def slice_blocks(self, payload: Payload, lo: int, hi: int) -> Payload:
        if not 0 <= lo <= hi <= numel(payload.shape):
            raise ValueError(f"none: entries [{lo}, {hi}) are outside the payload's {numel(payload.shape)}")
        return Payload({"values": payload.buffers["values"][lo:hi]}, (hi - lo,), payload.dtype)

    def requantizer(self) -> Codec:
        return self  # stateless

    def encode(self, tensor: torch.Tensor) -> Payload:
        return Payload({"values": tensor.detach().reshape(-1)}, tuple(tensor.shape), tensor.dtype)

    def decode(self, payload: Payload) -> torch.Tensor:
        if set(payload.buffers) != {"values"}:
            raise ValueError(f"none: payload has buffers {sorted(payload.buffers)}, expected ['values']")
        values = payload.buffers["values"]
        if values.numel() != numel(payload.shape):
            raise ValueError(
                f"payload has {values.numel()} values, expected {numel(payload.shape)} for {payload.shape}"
            )
        return values.reshape(payload.shape).to(payload.dtype)

    def layout(self, shape: tuple[int, ...], dtype: torch.dtype) -> list[BufferSpec]:
        return [("values", dtype, numel(shape))]


def numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    out = tuple(int(s) for s in shape)
    if any(s < 0 for s in out):
        raise ValueError(f"invalid shape {shape}: negative size")
    return out


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def require(ok: bool | torch.Tensor, codec: str, what: str) -> None:
    """Raise a ``ValueError`` naming the codec unless ``ok`` (a bool or a one-element bool tensor)."""
    if not bool(ok):
        raise ValueError(f"{codec}: malformed payload: {what}")


def flat_float(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor as a 1-D fp32 tensor; a view when no copy is needed (e.g. a row of a stacked fp32 tensor)."""
    return tensor.detach().reshape(-1).to(torch.float32)


def blocks(x: torch.Tensor, block_size: int) -> torch.Tensor:
    """A 1-D tensor zero-padded to whole blocks and viewed as (n_blocks, block_size)."""
    n = x.numel()
    nb = -(-n // block_size)
    pad = nb * block_size - n
    if pad:
        x = torch.cat([x, x.new_zeros(pad)])
    return x.reshape(nb, block_size)


def check_block_size(block_size: int) -> int:
    if int(block_size) < 1:
        raise ValueError(f"compression.block_size={block_size!r} is invalid: must be >= 1")
    return int(block_size)
