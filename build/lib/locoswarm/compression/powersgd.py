"""PowerSGD low-rank compression (Vogels et al., 2019): ``powersgd``.

A tensor of shape (d0, d1, ...) is viewed as the matrix M (n = d0) x (m = d1 * d2 * ...). One step of subspace
iteration, warm-started from the previous round's Q (m x r, kept in the codec; the first Q is drawn from the
shared seed): P = orth(M Q) (Householder QR, so P is orthonormal even when M Q is rank-deficient), then
Q' = Mᵀ P, whose column-normalised copy is the next round's warm start (a zero column keeps its old
direction). x̂ = P Q'ᵀ = P Pᵀ M.

Rank: with ratio < 1, r = max(1, floor(ratio * n * m / (n + m))) so the factors take about ``ratio`` of the fp32
bytes; with ratio = 1, r = ``rank``. Either way r <= min(n, m).

Wire: ``p`` n*r x fp32 then ``q`` m*r x fp32 (row-major P, Q') -> ratio r (n + m) / (n m) against fp32.
Tensors with fewer than 2 dims, empty ones, and matrices where the factors would not be smaller
(r (n + m) >= n m) are sent raw instead: ``values`` n x the tensor's dtype (lossless).

Error bound: x̂ is the orthogonal projection of M's columns onto span(P), so ||x - x̂||_F <= ||x||_F (up to
fp32 rounding). If rank(M) <= r, span(P) = span(M) for a generic Q and x̂ = M up to fp32 rounding from the
first round on; repeating the same M is subspace iteration, converging to the best rank-r approximation
(Eckart-Young) at rate sigma_{r+1} / sigma_r per round. Inputs with inf/NaN raise ``ValueError`` (they would
poison the warm-started Q).
"""

from __future__ import annotations

import math

import torch

from locoswarm.compression.base import BufferSpec, Codec, Payload, numel, require


class PowerSGDCodec(Codec):
    name = "powersgd"

    def __init__(self, rank: int = 4, ratio: float = 1.0, seed: int = 0) -> None:
        if int(rank) < 1:
            raise ValueError(f"compression.rank={rank!r} is invalid: must be >= 1")
        if not 0 < float(ratio) <= 1:
            raise ValueError(f"compression.ratio={ratio!r} is invalid: must be in (0, 1]")
        self.rank = int(rank)
        self.ratio = float(ratio)
        self.seed = int(seed)
        self.q: torch.Tensor | None = None  # (m, r) fp32 warm start

    def plan(self, shape: tuple[int, ...]) -> tuple[int, int, int] | None:
        """(n, m, r) for a tensor of this shape, or None when it is sent raw."""
        if len(shape) < 2 or numel(shape) == 0:
            return None
        n = shape[0]
        m = numel(shape) // n
        r = math.floor(round(self.ratio * n * m / (n + m), 6)) if self.ratio < 1 else self.rank
        r = max(1, min(r, n, m))
        if r * (n + m) >= n * m:
            return None
        return n, m, r

    def encode(self, tensor: torch.Tensor) -> Payload:
        shape = tuple(tensor.shape)
        plan = self.plan(shape)
        if plan is None:
            return Payload({"values": tensor.detach().reshape(-1)}, shape, tensor.dtype)
        n, m, r = plan
        # contiguous: a strided view (e.g. a column of a stacked tensor) would take another BLAS path and give
        # bytes that differ in the last bit from the same values held contiguously
        mat = tensor.detach().reshape(n, m).to(torch.float32).contiguous()
        if not bool(torch.isfinite(mat).all()):
            raise ValueError("powersgd: cannot encode a tensor with inf or NaN entries")
        q = self._warm_start(m, r, mat.device)
        p = torch.linalg.qr(mat @ q).Q  # (n, r), orthonormal columns
        q_new = mat.T @ p  # (m, r)
        # the warm start only needs Q's column space: keep unit columns so that tiny or huge tensors neither
        # underflow nor overflow in M Q next round; a zero column (M = 0 along it) keeps its old direction
        norms = q_new.norm(dim=0)
        self.q = torch.where(norms > 0, q_new / torch.where(norms > 0, norms, 1.0), q)
        return Payload({"p": p.reshape(-1), "q": q_new.reshape(-1)}, shape, tensor.dtype)

    def decode(self, payload: Payload) -> torch.Tensor:
        self.check_payload(payload)
        plan = self.plan(payload.shape)
        if plan is None:
            return payload.buffers["values"].reshape(payload.shape).to(payload.dtype)
        n, m, r = plan
        p, q = payload.buffers["p"], payload.buffers["q"]
        require(torch.isfinite(p).all() & torch.isfinite(q).all(), self.name, "a factor entry is NaN or inf")
        return (p.reshape(n, r) @ q.reshape(m, r).T).reshape(payload.shape).to(payload.dtype)

    def layout(self, shape: tuple[int, ...], dtype: torch.dtype) -> list[BufferSpec]:
        plan = self.plan(shape)
        if plan is None:
            return [("values", dtype, numel(shape))]
        n, m, r = plan
        return [("p", torch.float32, n * r), ("q", torch.float32, m * r)]

    def _warm_start(self, m: int, r: int, device: torch.device) -> torch.Tensor:
        if self.q is None:
            gen = torch.Generator().manual_seed(self.seed & (2**63 - 1))
            self.q = torch.randn(m, r, generator=gen).to(device)
        if tuple(self.q.shape) != (m, r):
            raise ValueError(
                f"powersgd: this codec holds Q for a {tuple(self.q.shape)} factor, got a tensor needing ({m}, {r}); "
                "use one codec per tensor"
            )
        return self.q.to(device)
