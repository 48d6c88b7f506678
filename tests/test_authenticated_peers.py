"""Authenticated peers on backend=hivemind, against real DHTs and averagers on 127.0.0.1 (comm/identity.py):

- a forged DHT record (another peer's subkey, unsigned or signed with the forger's own key) is rejected by
  every honest node: the honest peers read the victim's true record, never the forgery;
- with ``backend.allowed_peers``, a real locoswarm peer that is not on the list (the issue's outsider: it only
  joined the DHT with the printed address and runs an averager of the same shape) neither enters the honest
  peers' averaging group nor serves them state: their average is the mean of the listed peers' inputs and a
  joiner downloads the listed donor's state although the outsider advertises a newer one;
- ``locoswarm-swarm keygen`` and the config errors for a bad identity or allow-list.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path

import pytest
import torch
from test_hivemind_rounds import _inputs, _run


def _wait_for(what, limit: float = 60.0) -> None:
    end = time.monotonic() + limit
    while not what() and time.monotonic() < end:
        time.sleep(0.2)


# ---------------------------------------------------------------------------------------------- forged records
def _forgery(index: int, run_id: str, peers_q, out_q) -> None:
    import multiprocessing as mp

    from hivemind.dht import DHT
    from hivemind.dht.crypto import RSASignatureValidator
    from hivemind.dht.validation import DHTRecord, RecordValidatorBase
    from hivemind.utils import MSGPackSerializer
    from hivemind.utils.crypto import RSAPrivateKey
    from hivemind.utils.timed_storage import get_dht_time

    from locoswarm.comm.hivemind import HivemindAverager
    from locoswarm.config import BackendConfig

    os.environ["OMP_NUM_THREADS"] = "1"
    mp.set_start_method("fork", force=True)
    forger_key = RSAPrivateKey()

    class Forger(RecordValidatorBase):
        _SIGNATURE_RE = RSASignatureValidator._SIGNATURE_RE

        """Stores anything, and 'signs' every record with the forger's own key, whoever the subkey names."""

        def validate(self, record: DHTRecord) -> bool:
            return True

        def sign_value(self, record: DHTRecord) -> bytes:
            signature = forger_key.sign(MSGPackSerializer.dumps(dataclasses.astuple(record)))
            return record.value + b"[signature:" + signature + b"]"

        def strip_value(self, record: DHTRecord) -> bytes:
            return RSASignatureValidator.strip_value(self, record)  # reads its own forgeries back

    cfg = BackendConfig(name="hivemind", run_id=run_id, min_matchmaking_time=0.5)
    peers, forger = [], None
    try:
        victim = HivemindAverager(cfg, workers=2, rank=0)
        peers.append(victim)
        reader = HivemindAverager(dataclasses.replace(cfg, initial_peers=victim.maddrs), workers=2, rank=1)
        peers.append(reader)
        victim.round = victim.finished = 3
        victim._publish_progress()
        key = victim._progress_key
        me = victim.dht.peer_id
        _wait_for(lambda: me.to_bytes().hex() in reader.progress())
        forger = DHT(initial_peers=victim.maddrs, start=True, record_validators=[Forger()])
        # what a forger can write: the victim's owner-marked subkey with the forger's signature, the victim's peer
        # id as a plain subkey, and a record of its own under a subkey that names no key at all
        forged = {"round": 999, "rank": 0, "in_sync": True, "finished": 999, "period": 1.0, "launched": 0}
        stored = {}
        for name, subkey in [("owner marker, wrong signature", victim._owner), ("plain peer id", me.to_bytes()),
                             ("no owner", b"nobody")]:  # fmt: skip
            stored[name] = bool(forger.store(key, forged, get_dht_time() + 300, subkey=subkey))
        # a record the forger signs with its own key under its own marker is valid: it is the forger's record
        own = RSASignatureValidator(forger_key).local_public_key
        stored["forger's own"] = bool(forger.store(key, {**forged, "rank": 1}, get_dht_time() + 300, subkey=own))
        time.sleep(1.0)
        raw = forger.get(key, latest=True)  # the forger's node kept everything it wrote
        seen = {name: p.progress() for name, p in (("victim", victim), ("reader", reader))}
        out_q.put((index, {"stored": stored, "forger_holds": len(raw.value) if raw else 0, "seen": seen,
                           "victim": me.to_bytes().hex()}, None))  # fmt: skip
    except BaseException:  # noqa: BLE001
        out_q.put((index, None, traceback.format_exc()))
    finally:
        if forger is not None:
            forger.shutdown()
        for p in peers:
            p.close()


@pytest.mark.network
@pytest.mark.slow
def test_a_forged_dht_record_is_rejected():
    """The issue's attack: another process writes a peer's progress record (here claiming round 999). Every honest
    node reads the victim's own record (round 3); the forgeries, though the forger's node holds them, are
    dropped on receipt, and a record signed by the forger under its own key is attributed to the forger."""
    (res,) = _run(_forgery, f"forge{os.getpid()}", timeout=150.0)
    assert res["forger_holds"] >= 3, res  # the attack really reached the DHT
    for who, progress in res["seen"].items():
        assert progress[res["victim"]]["round"] == 3, (who, progress)
        assert all(r["round"] != 999 or r["rank"] == 1 for r in progress.values()), (who, progress)
        forgers = [k for k, r in progress.items() if r["round"] == 999]
        assert len(forgers) <= 1 and res["victim"] not in forgers, (who, progress)


# ---------------------------------------------------------------------------------------------- allowed_peers
def _closed_swarm(index: int, run_id: str, folder: str, peers_q, out_q) -> None:
    import multiprocessing as mp

    from locoswarm.cli.swarm import keygen
    from locoswarm.comm.hivemind import HivemindAverager
    from locoswarm.config import BackendConfig

    os.environ["OMP_NUM_THREADS"] = "1"
    mp.set_start_method("fork", force=True)
    root = Path(folder)
    ids = [root / f"peer-{i}.key" for i in range(3)]
    out = {}
    averagers: list = []
    try:
        import contextlib
        import io

        listing = io.StringIO()
        with contextlib.redirect_stdout(listing):
            assert keygen([str(p) for p in ids]) == 0
        (root / "allowed.txt").write_text("# the run's peers\n" + listing.getvalue())
        cfg = BackendConfig(name="hivemind", run_id=run_id, min_matchmaking_time=1.0, round_timeout=20.0,
                            allowed_peers=str(root / "allowed.txt"))  # fmt: skip
        first = HivemindAverager(dataclasses.replace(cfg, identity=str(ids[0])), workers=2, rank=0)
        averagers.append(first)
        joined = dataclasses.replace(cfg, initial_peers=first.maddrs)
        second = HivemindAverager(dataclasses.replace(joined, identity=str(ids[1])), workers=2, rank=1)
        averagers.append(second)
        # the outsider: the same run id and shapes, any identity, no allow-list of its own; it sends 1e6s
        outsider = HivemindAverager(dataclasses.replace(joined, allowed_peers=None), workers=2, rank=1)
        averagers.append(outsider)
        out["outsider_visible"] = False

        # --- averaging: all three start round 1 (in the main thread: starting an averager process needs it)
        inputs = {"first": _inputs(0, 0), "second": _inputs(1, 0), "outsider": [torch.full_like(t, 1e6)
                  for t in _inputs(2, 0)]}  # fmt: skip
        handles = {name: a.start([t.unsqueeze(0) for t in inputs[name]], torch.tensor([1.0]))
                   for name, a in zip(("first", "second", "outsider"), averagers, strict=True)}  # fmt: skip
        results = {name: h.wait() for name, h in handles.items()}
        expected = [(a + b) / 2 for a, b in zip(inputs["first"], inputs["second"], strict=True)]
        for name in ("first", "second"):
            r = results[name]
            out[name] = {"group": r.group_size, "members": r.members, "rejected": r.rejected,
                         "max_err": max(float((m - e).abs().max()) for m, e in zip(r.tensors, expected,
                                                                                   strict=True))}  # fmt: skip
        r = results["outsider"]
        out["outsider"] = {"group": r.group_size, "members": r.members}
        seen = {bytes.fromhex(k) for a in averagers[:2] for k in a.progress()}
        out["outsider_visible"] = outsider.dht.peer_id.to_bytes() in seen

        # --- state: a third listed peer joins; the donor serves round 1, the outsider advertises round 10**6
        def state(tag):
            return {"from": tag}

        received: list = []
        second.attach_run_state(lambda: state("listed donor"), received.append, rounds=second.round)
        outsider.attach_run_state(lambda: state("outsider"), received.append, rounds=10**6)
        stop = threading.Event()

        def serve() -> None:  # the donors' main loops: a round boundary now and then
            while not stop.is_set():
                for a in (second, outsider):
                    a.round_boundary()
                time.sleep(0.3)

        server = threading.Thread(target=serve, daemon=True)
        server.start()
        joiner = HivemindAverager(dataclasses.replace(joined, identity=str(ids[2])), workers=3, rank=2)
        averagers.append(joiner)
        got: list = []
        out["joiner_sees"] = joiner.progress()
        joiner.attach_run_state(lambda: state("joiner"), got.append)
        stop.set()
        server.join(timeout=30)
        out["joiner_state"] = got
        out_q.put((index, out, None))
    except BaseException:  # noqa: BLE001
        out_q.put((index, None, traceback.format_exc()))
    finally:
        for a in averagers:
            a.close()


@pytest.mark.network
@pytest.mark.slow
def test_an_outsider_cannot_enter_a_closed_swarm(tmp_path):
    """backend.allowed_peers lists two peers (and a later joiner); an outsider with the run id and the printed
    address averages 1e6s with them and advertises a far newer state. The listed peers average only each other
    (their exact mean: the outsider's values are nowhere in it), never see its records, and the joiner loads the
    listed donor's state."""
    (res,) = _run(_closed_swarm, f"closed{os.getpid()}", str(tmp_path), timeout=280.0)
    for name in ("first", "second"):
        r = res[name]
        assert r["group"] == 2 and r["members"] == [0, 1], res
        assert r["max_err"] <= 1e-6, res
    assert not res["outsider_visible"], res
    assert res["joiner_state"] == [{"from": "listed donor"}], {k: res[k] for k in ("joiner_sees", "joiner_state")}


# ---------------------------------------------------------------------------------------------- CLI and config
def test_keygen_writes_identities_and_prints_their_peer_ids(tmp_path):
    from hivemind.p2p import PeerID

    from locoswarm.comm.identity import load, read_allowed_peers

    files = [tmp_path / "a" / "id.key", tmp_path / "b.key"]
    cmd = [sys.executable, "-m", "locoswarm.cli.swarm", "keygen", *map(str, files)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    printed = done.stdout.split()
    assert printed == [str(load(f).peer_id) for f in files] and len(set(printed)) == 2
    (tmp_path / "allowed.txt").write_text(done.stdout)
    assert read_allowed_peers(tmp_path / "allowed.txt") == {PeerID.from_base58(p) for p in printed}
    again = subprocess.run(cmd[:-1], capture_output=True, text=True, timeout=120)  # never overwrites
    assert again.returncode == 1 and "exists" in again.stderr
    assert str(load(files[0]).peer_id) == printed[0]


def test_bad_identity_or_allow_list_fails_naming_the_key(tmp_path):
    from locoswarm.cli.swarm import compose_config
    from locoswarm.comm.identity import load, read_allowed_peers

    with pytest.raises(ValueError, match="backend.identity"):
        compose_config(["backend=hivemind", f"backend.identity={tmp_path / 'missing.key'}"])
    with pytest.raises(ValueError, match="backend.allowed_peers"):
        compose_config(["backend=hivemind", f"backend.allowed_peers={tmp_path / 'missing.txt'}"])
    (tmp_path / "junk.key").write_bytes(b"not a key")
    with pytest.raises(ValueError, match="backend.identity: .*junk.key is not a peer identity"):
        load(tmp_path / "junk.key")
    (tmp_path / "allowed.txt").write_text("# ok\nQmQdHt7v3rJ7WfVkJ1mvi1CvqVst6m71RNbSKsyU4aMNuL\nnot-a-peer\n")
    with pytest.raises(ValueError, match=r"allowed.txt:3: 'not-a-peer' is not a peer id"):
        read_allowed_peers(tmp_path / "allowed.txt")
    (tmp_path / "empty.txt").write_text("# nobody\n")
    with pytest.raises(ValueError, match="lists no peer"):
        read_allowed_peers(tmp_path / "empty.txt")
