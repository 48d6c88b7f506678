"""Fast checks (no network) for the robust-aggregation plumbing of the real backends: what hivemind accepts as a
groupmate's round metadata, the owners' screening reports of the reduce-scatter, and which attacks a real swarm
may run (a test-only peer mode)."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import tiny_config

from locoswarm.comm.exchange import LocalCodecs, merge_dropped
from locoswarm.comm.hivemind import _pack_report, _unpack_report, malformed_metadata
from locoswarm.config import CompressionConfig, validate

GOOD = {"t": 1.7e9, "w": 96.0, "round": 4, "rank": 2}


@pytest.mark.parametrize(
    ("info", "reason"),
    [
        ({k: v for k, v in GOOD.items() if k != "t"}, "without 't'"),
        ({k: v for k, v in GOOD.items() if k not in ("w", "rank")}, "without 'w', 'rank'"),
        ([1, 2], "is a list"),
        (None, "is a NoneType"),
        ({**GOOD, "t": "now"}, "t='now'"),
        ({**GOOD, "t": math.inf}, "t=inf"),
        ({**GOOD, "w": math.nan}, "w=nan"),
        ({**GOOD, "w": -1.0}, "w=-1.0"),
        ({**GOOD, "w": True}, "w=True"),
        ({**GOOD, "round": 5}, "round=5, expected 4"),
        ({**GOOD, "round": 4.0}, "round=4.0"),
        ({**GOOD, "rank": 3}, "rank=3"),
        ({**GOOD, "rank": -1}, "rank=-1"),
        ({**GOOD, "rank": None}, "rank=None"),
    ],
)
def test_malformed_metadata_is_named(info, reason):
    why = malformed_metadata(info, number=4, workers=3)
    assert why is not None and reason in why, why


def test_well_formed_metadata_passes():
    assert malformed_metadata(GOOD, number=4, workers=3) is None
    assert malformed_metadata({**GOOD, "w": 0, "t": 5, "extra": object()}, number=4, workers=3) is None


def test_screening_reports_round_trip_and_merge_in_the_sims_order():
    report = [{0: "non-finite values"}, {}, {1: "norm 9 > 3 x the median 1"}]
    assert _unpack_report(_pack_report(report), owners=2, sender="p") == report
    assert _unpack_report(b"", owners=2, sender="p") == []
    for garbage in (b"\xff", b"{}", b'[{"5": "x"}]', b'[["a"]]'):  # malformed or out of range: ignored
        assert _unpack_report(garbage, owners=2, sender="p") == []
    # tensor-major, then owner order: the later (tensor, owner) wins, as in the sim's dropped.update loop
    merged = merge_dropped([[{0: "a"}, {1: "b"}], [{0: "c"}, {}]])
    assert merged == {0: "c", 1: "b"}


def test_a_round_can_be_undone_on_the_codecs():
    codecs = LocalCodecs(CompressionConfig(name="topk", ratio=0.25, error_feedback=True), 0)
    x = [torch.randn(8, 4), torch.randn(5)]
    codecs.encode(x, round_=0)
    before = [r.clone() for r in codecs.residuals()]
    snap = codecs.snapshot(len(x))
    codecs.encode(x, round_=1)
    assert not torch.equal(codecs.residuals()[0], before[0])
    codecs.restore(snap)
    assert all(torch.equal(a, b) for a, b in zip(codecs.residuals(), before, strict=True))


def test_attackers_on_the_backends():
    """hivemind runs the attack as a test-only peer mode; alie (it reads the honest rows) and torch stay sim-only."""
    validate(tiny_config(workers=3, faults__byzantine=1, faults__attack="nan", backend__name="hivemind"))
    with pytest.raises(ValueError, match=r"faults\.attack='alie' is invalid"):
        validate(tiny_config(workers=3, faults__byzantine=1, faults__attack="alie", backend__name="hivemind"))
    with pytest.raises(ValueError, match=r"faults\.byzantine=1 is invalid"):
        validate(tiny_config(workers=3, faults__byzantine=1, faults__attack="nan", backend__name="torch"))
    validate(tiny_config(workers=3, faults__byzantine=1, faults__attack="alie"))  # sim
