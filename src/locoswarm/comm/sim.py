"""In-process averaging for the ``sim`` backend: exact weighted means, bytes counted as if sent.

Each local worker's contribution goes through its own codec (encode, count ``payload.nbytes``, decode), so
lossy compression changes the numbers exactly as it would on a network, and the byte count is the real
payload size priced by the network model's topology. Blockwise quantisers (int8, int4) go through the real
backends' re-quantising reduce-scatter (``comm/exchange.py``) on the same chunks, so the mean is quantised twice
here too, and the real backends reproduce it bit for bit.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from locoswarm.comm.base import Averager, Round
from locoswarm.comm.exchange import assemble_chunks, chunk_payloads, reduce_chunk
from locoswarm.compression import Codec
from locoswarm.netsim import NetworkModel, wire_bytes


class SimAverager(Averager):
    def __init__(self, codec_factory: Callable[[int], Codec], network: NetworkModel):
        """codec_factory(tensor_index) builds one codec; one is kept per (worker, tensor)."""
        self.codec_factory = codec_factory
        self.network = network
        self._codecs: dict[tuple[int, int], Codec] = {}
        self.round = 0  # averaging rounds so far: shared randomness (random-k's indices) is keyed by it

    def _codec(self, worker: int, index: int) -> Codec:
        key = (worker, index)
        if key not in self._codecs:
            self._codecs[key] = self.codec_factory(index)
        return self._codecs[key]

    @torch.no_grad()
    def average(self, tensors: Sequence[torch.Tensor], weights: torch.Tensor) -> Round:
        weights = weights.to(torch.float64)
        if weights.ndim != 1 or (weights < 0).any() or weights.sum() <= 0:
            raise ValueError(f"weights must be a non-negative (L,) vector with a positive sum, got {weights.tolist()}")
        local = weights.numel()
        # Normalise first: with one worker the share is exactly 1.0 and the mean is bit-identical to the input.
        shares = (weights / weights.sum()).tolist()
        payload_bytes = [0] * local
        raw_bytes = 0
        out = []
        # a masked (finished or dropped) worker contributes nothing and sends nothing
        members = [w for w in range(local) if shares[w] != 0.0]
        member_shares = [shares[w] for w in members]
        for i, stacked in enumerate(tensors):
            if stacked.shape[0] != local:
                raise ValueError(f"tensor {i} has leading dim {stacked.shape[0]}, expected {local} local workers")
            codecs = [self._codec(w, i) for w in members]
            for c in codecs:
                c.align_round(self.round)  # a worker masked in earlier rounds still picks this round's indices
            if codecs[0].reducible and len(members) > 1:
                # the real backends' re-quantising reduce-scatter (comm/exchange.py), on the same chunks
                payloads = [c.encode(stacked[w]) for c, w in zip(codecs, members, strict=True)]
                for w, p in zip(members, payloads, strict=True):
                    payload_bytes[w] += p.nbytes
                n = len(members)
                pieces = [chunk_payloads(c, p, n) for c, p in zip(codecs, payloads, strict=True)]
                requantizer = codecs[0].requantizer()
                chunks = [reduce_chunk(requantizer, [pp[j] for pp in pieces], member_shares) for j in range(n)]
                out.append(assemble_chunks(codecs[0], payloads[0], chunks))
            else:
                acc = torch.zeros_like(stacked[0])
                for codec, w in zip(codecs, members, strict=True):
                    payload = codec.encode(stacked[w])
                    payload_bytes[w] += payload.nbytes
                    acc.add_(codec.decode(payload), alpha=shares[w])
                out.append(acc)
            raw_bytes += stacked[0].numel() * 4
        self.round += 1
        active = [payload_bytes[w] for w in members]
        mean_payload = sum(active) / len(active)
        # Payloads a real network can neither sum on the wire nor re-quantise per chunk are all-gathered there
        # (comm/exchange.py): priced so. Reduce-scatter + gather moves what an all-reduce does.
        allgather = not all(c.summable or c.reducible for c in self._codecs.values())
        sent, received = zip(*(self._wire(b, len(active), allgather) for b in active), strict=True)
        return Round(
            tensors=out,
            group_size=len(active),
            bytes_sent=sum(sent) / len(active),
            bytes_received=sum(received) / len(active),
            seconds=0.0,
            compression_ratio=mean_payload / raw_bytes if raw_bytes else 1.0,
            payload_bytes=mean_payload,
            total_weight=float(weights.sum()),
            allgather=allgather,
        )

    def _wire(self, payload_bytes: float, group: int, allgather: bool) -> tuple[float, float]:
        # a masked (absent) worker is not part of the all-reduce: the group is the workers that take part
        return wire_bytes(self.network.topology, group, payload_bytes, allgather)

    def modelled_seconds(self, payload_bytes: float, allgather: bool = False) -> float:
        return self.network.comm_seconds(payload_bytes, allgather=allgather)

    def state_dict(self) -> dict:
        # Codecs may carry state across rounds (error feedback, PowerSGD); they are plain picklable objects.
        return {"codecs": self._codecs, "round": self.round}

    def load_state_dict(self, state: dict) -> None:
        self._codecs = dict(state["codecs"])
        self.round = int(state.get("round", 0))
