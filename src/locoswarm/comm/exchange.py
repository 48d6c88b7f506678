"""Compressed exchange on a real network: what a peer sends for its codec, and how the group's payloads become
the weighted mean. Shared by ``backend=torch`` and ``backend=hivemind`` (one worker per process).

There are two ways, and the codec decides (``Codec.summable``):

- **all-reduce the wire buffer** (summable codecs: ``none``, ``fp16``, ``bf16``, ``randomk``). A payload is one
  ``values`` buffer that is linear in the input, and peers of one round agree on the rest (random-k's indices come
  from the shared seed and the round number, which every peer aligns to). Each peer encodes, the backend sums
  ``share x values`` across the group (a bandwidth-optimal all-reduce of only the wire bytes: random-k sends its
  k values and never an index), and everyone decodes the sum once.
- **all-gather the payloads** (every other codec: ``int8``, ``int4``, ``sign``, ``topk``, ``powersgd``). Their
  payloads carry per-peer scales, indices or factors, so they cannot be summed on the wire. Each peer sends its
  whole payload to every groupmate, and every peer decodes all of them and sums ``share x decode`` in rank
  order: exactly the ``sim`` backend's arithmetic, so the result matches it bit for bit. It costs (n-1) payloads
  each way instead of the all-reduce's 2(n-1)/n, which is why ``NetworkModel`` prices these codecs as an
  all-gather too.

Error feedback and PowerSGD's warm start live in this process's codecs (one per tensor), so they are checkpointed
with the averager's ``state_dict``; nothing of them crosses the wire.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from locoswarm.compression import Codec, Payload, codec_factory


def allgather_bytes(group: int, payload_bytes: float) -> float:
    """Bytes one peer sends (and receives) to all-gather a payload of ``payload_bytes`` in a group of ``group``."""
    return max(0, group - 1) * float(payload_bytes)


class LocalCodecs:
    """The codecs of one worker, one per tensor, built lazily with the run's shared seeds."""

    def __init__(self, compression_cfg, run_seed: int):
        self._factory = codec_factory(compression_cfg, run_seed)
        self._codecs: list[Codec] = []

    def codecs(self, count: int) -> list[Codec]:
        while len(self._codecs) < count:
            self._codecs.append(self._factory(len(self._codecs)))
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
    def wire_values(self, payloads: Sequence[Payload]) -> torch.Tensor:
        """The payloads' ``values`` buffers as one flat tensor in their (common) wire dtype."""
        dtypes = {p.buffers["values"].dtype for p in payloads}
        if len(dtypes) != 1:
            raise ValueError(f"summable payloads of one worker must share a wire dtype, got {sorted(map(str, dtypes))}")
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
        """sum_j shares[j] * decode(blobs[j]), per tensor, accumulated in the order given (the sim's arithmetic).

        ``like``: this worker's own payloads of the round (shapes, dtypes and the agreed meta). A blob of the
        wrong length or that fails a codec's checks raises ``ValueError`` before anything is accumulated."""
        codecs = self.codecs(len(like))
        sizes = [c.wire_nbytes(p.shape, p.dtype) for c, p in zip(codecs, like, strict=True)]
        decoded_per_peer = []
        for j, blob in enumerate(blobs):
            if len(blob) != sum(sizes):
                raise ValueError(f"peer {j}'s payload has {len(blob)} bytes, expected {sum(sizes)}")
            view, offset, tensors = memoryview(blob), 0, []
            for codec, p, size in zip(codecs, like, sizes, strict=True):
                payload = codec.payload_from_bytes(
                    view[offset : offset + size], p.shape, p.dtype, device=_device(p), meta=dict(p.meta)
                )
                tensors.append(codec.decode(payload))
                offset += size
            decoded_per_peer.append(tensors)
        out = []
        for i in range(len(like)):
            acc = torch.zeros_like(decoded_per_peer[0][i])
            for share, tensors in zip(shares, decoded_per_peer, strict=True):
                if share != 0.0:
                    acc.add_(tensors[i], alpha=share)
            out.append(acc)
        return out

    def state_dict(self) -> dict:
        return {"codecs": list(self._codecs)}

    def load_state_dict(self, state: dict) -> None:
        self._codecs = list(state["codecs"])


def _device(payload: Payload) -> torch.device:
    return next(iter(payload.buffers.values())).device if payload.buffers else torch.device("cpu")
