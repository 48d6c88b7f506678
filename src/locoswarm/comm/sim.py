"""In-process averaging for the ``sim`` backend: exact weighted means, bytes counted as if sent.

Each local worker's contribution goes through its own codec (encode, count ``payload.nbytes``, decode), so
lossy compression changes the numbers exactly as it would on a network, and the byte count is the real
payload size priced by the network model's topology. Blockwise codecs (int8, int4, sign, blocktopk) go through the
real backends' re-quantising reduce-scatter (``comm/exchange.py``) on the same chunks, so the mean is encoded twice
here too, and the real backends reproduce it bit for bit.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from locoswarm.comm.aggregate import (
    Aggregator,
    WeightedMean,
    combine,
    exchange_path,
    normalised_shares,
    reject_nonfinite_sum,
)
from locoswarm.comm.base import Averager, Round
from locoswarm.comm.exchange import assemble_chunks, chunk_payloads, reduce_chunk
from locoswarm.compression import Codec
from locoswarm.netsim import NetworkModel, wire_bytes


class SimAverager(Averager):
    """Rounds complete when started (``Finished`` handles); ``Round.seconds`` is the network model's price of the
    exchange among the round's members, so a strategy can place it on its modelled timeline."""

    def __init__(
        self,
        codec_factory: Callable[[str, int], Codec],
        network: NetworkModel,
        aggregator: Aggregator | None = None,
        max_norm_ratio: float | None = None,
    ):
        """codec_factory(key, tensor_index) builds one codec; one is kept per (key, worker, tensor).
        aggregator, max_norm_ratio: how contributions are screened and combined (comm/aggregate.py)."""
        self.codec_factory = codec_factory
        self.network = network
        self.mean = WeightedMean()
        self.aggregator = aggregator if aggregator is not None else self.mean
        self.max_norm_ratio = max_norm_ratio
        self._codecs: dict[tuple[str, int, int], Codec] = {}
        # Rounds started so far, every key together: every peer starts the same rounds in the same order, so this
        # sequence number keys shared randomness (random-k's indices) on every backend.
        self.round = 0

    def _codec(self, key: str, worker: int, index: int) -> Codec:
        if (key, worker, index) not in self._codecs:
            self._codecs[(key, worker, index)] = self.codec_factory(key, index)
        return self._codecs[(key, worker, index)]

    @torch.no_grad()
    def _round(self, tensors: list[torch.Tensor], weights: torch.Tensor, key: str, ranks) -> Round:
        local = weights.numel()
        ranks = list(range(local)) if ranks is None else list(ranks)
        for i, stacked in enumerate(tensors):
            if stacked.shape[0] != local:
                raise ValueError(f"tensor {i} has leading dim {stacked.shape[0]}, expected {local} local workers")
        # Normalise first: with one worker the share is exactly 1.0 and the mean is bit-identical to the input.
        shares = normalised_shares(weights)
        number = self.round
        self.round = number + 1
        # a masked (finished or dropped) worker contributes nothing and sends nothing
        members = [w for w in range(local) if shares[w] != 0.0]
        member_shares = [shares[w] for w in members]
        # a worker's codecs (their residuals) follow its rank, not its row: a pipeline peer that moves to another
        # slot keeps its own, and a slot it leaves hands nothing on
        codecs = [[self._codec(key, ranks[w], i) for i in range(len(tensors))] for w in members]  # [member][tensor]
        for c in (c for row in codecs for c in row):
            c.align_round(number)  # a worker masked in earlier rounds still picks this round's indices
        flat = [c for row in codecs for c in row]
        path = exchange_path(all(c.summable for c in flat), all(c.reducible for c in flat), self.aggregator)
        payloads, unsent = [], {}
        for row, w in zip(codecs, members, strict=True):
            try:
                payloads.append([c.encode(t[w]) for c, t in zip(row, tensors, strict=True)])
            except ValueError as e:  # e.g. a quantiser refuses NaN: this worker sends nothing this round
                payloads.append(None)
                unsent[w] = f"could not encode: {e}"
        if unsent:
            keep = [j for j, p in enumerate(payloads) if p is not None]
            if not keep:
                raise ValueError(f"round {number} ({key}): no worker could encode its contribution: {unsent}")
            members = [members[j] for j in keep]
            codecs, payloads = [codecs[j] for j in keep], [payloads[j] for j in keep]
            total = sum(member_shares[j] for j in keep)
            member_shares = [member_shares[j] / total for j in keep]
        if path == "reduce_scatter" and len(members) > 1:
            out, dropped = self._reduce_scatter(codecs, payloads, member_shares)
        else:
            rows = [
                [c.decode(p) for c, p in zip(row, ps, strict=True)] for row, ps in zip(codecs, payloads, strict=True)
            ]
            if path == "allreduce":  # summed on the wire: only the sum can be screened
                out = self.mean(rows, member_shares)
                out, dropped = reject_nonfinite_sum(out, range(len(members)))
            else:
                out, dropped = combine(self.aggregator, rows, member_shares, self.max_norm_ratio)
        payload_bytes = [sum(p.nbytes for p in ps) for ps in payloads]
        raw_bytes = sum(t[0].numel() * 4 for t in tensors)
        mean_payload = sum(payload_bytes) / len(payload_bytes)
        # Payloads a real network can neither sum on the wire nor re-quantise per chunk (or a robust aggregator
        # must see whole) are all-gathered there (comm/exchange.py): priced so. A reduce-scatter + gather moves
        # what an all-reduce does.
        allgather = path == "allgather"
        sent, received = zip(*(self._wire(b, len(members), allgather) for b in payload_bytes), strict=True)
        member_ranks = [ranks[w] for w in members]
        return Round(
            tensors=out,
            group_size=len(members),
            bytes_sent=sum(sent) / len(members),
            bytes_received=sum(received) / len(members),
            seconds=self.network.comm_seconds(mean_payload, member_ranks, allgather),
            compression_ratio=mean_payload / raw_bytes if raw_bytes else 1.0,
            payload_bytes=mean_payload,
            total_weight=float(weights.to(torch.float64).sum()),
            allgather=allgather,
            key=key,
            members=member_ranks,
            rejected=dict(
                sorted(
                    {
                        **{member_ranks[j]: why for j, why in dropped.items()},
                        **{ranks[w]: why for w, why in unsent.items()},
                    }.items()
                )
            ),  # fmt: skip
        )

    def _reduce_scatter(self, codecs, payloads, shares) -> tuple[list[torch.Tensor], dict[int, str]]:
        """The real backends' re-quantising reduce-scatter (comm/exchange.py), on the same chunks, per tensor."""
        n = len(payloads)
        out, dropped = [], {}
        for i in range(len(payloads[0])):
            pieces = [chunk_payloads(row[i], ps[i], n) for row, ps in zip(codecs, payloads, strict=True)]
            requantizer = codecs[0][i].requantizer()
            chunks = []
            for j in range(n):
                chunk, why = reduce_chunk(requantizer, [pp[j] for pp in pieces], shares, self.max_norm_ratio)
                chunks.append(chunk)
                dropped.update(why)
            out.append(assemble_chunks(codecs[0][i], payloads[0][i], chunks))
        return out, dropped

    def _wire(self, payload_bytes: float, group: int, allgather: bool) -> tuple[float, float]:
        # a masked (absent) worker is not part of the all-reduce: the group is the workers that take part
        return wire_bytes(self.network.topology, group, payload_bytes, allgather)

    def state_dict(self) -> dict:
        # Codecs may carry state across rounds (error feedback, PowerSGD); they are plain picklable objects.
        return {"codecs": dict(self._codecs), "round": self.round}

    def load_state_dict(self, state: dict) -> None:
        self._codecs = dict(state["codecs"])
        self.round = int(state["round"])
