"""Who a hivemind peer is, and which peers a run admits.

A peer's identity is its libp2p private key (an RSA key, the file hivemind's ``P2P(identity_path=...)`` reads):
its peer id is the hash of the public key, and libp2p authenticates every connection with it. The same key signs
the DHT records locoswarm writes (hivemind's ``RSASignatureValidator``): a record's subkey is the writer's
``[owner:<public key>]`` marker and its value carries the signature, so no other peer can overwrite or forge it,
and the record's writer is the peer id of that public key (``writer``). Records locoswarm reads without such a
subkey are ignored.

``backend.allowed_peers=FILE`` (one peer id per line, as ``locoswarm-swarm keygen`` prints it; ``#`` comments)
closes the run: ``AllowedPeersValidator`` makes this peer's DHT node refuse, store and pass on no record written
by anyone else (hivemind's matchmaking declarations and state-sharing records name their writer's peer id as the
subkey; locoswarm's own carry the signed marker), so an outsider is never offered as a group leader or a state
source, and the averagers refuse its requests (``comm/hivemind.py``).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import os
import tempfile
from pathlib import Path

import multihash
from cryptography.hazmat.primitives import serialization
from hivemind.dht.crypto import RSASignatureValidator
from hivemind.dht.validation import DHTRecord, RecordValidatorBase
from hivemind.p2p import P2P, PeerID
from hivemind.proto import crypto_pb2
from hivemind.utils import MSGPackSerializer
from hivemind.utils.crypto import RSAPrivateKey, RSAPublicKey


@dataclasses.dataclass(frozen=True)
class Identity:
    path: Path  # the libp2p identity file
    key: RSAPrivateKey
    peer_id: PeerID
    fresh: bool  # generated for this process only (no one can have it yet)

    @property
    def validator(self) -> RSASignatureValidator:
        return RSASignatureValidator(self.key)

    @property
    def owner(self) -> bytes:
        """The subkey of the records this peer signs."""
        return self.validator.local_public_key


def generate(path: str | Path) -> PeerID:
    """Write a new identity to ``path`` (readable by its owner only); returns its peer id."""
    path = Path(path)
    if path.exists():
        raise FileExistsError(f"{path} exists: an identity is never overwritten (remove it first)")
    path.parent.mkdir(parents=True, exist_ok=True)
    P2P.generate_identity(str(path))
    return PeerID.from_identity(path.read_bytes())


def load(path: str | Path) -> Identity:
    path = Path(path)
    try:
        data = path.read_bytes()
        der = crypto_pb2.PrivateKey.FromString(data).data
        key = RSAPrivateKey.__new__(RSAPrivateKey)  # hivemind's wrapper has no loader; this is its pickled form
        key.__setstate__({"_private_key": der})
        peer_id = PeerID.from_identity(data)
    except FileNotFoundError:
        raise ValueError(
            f"backend.identity: {path} does not exist (create it with: locoswarm-swarm keygen {path})"
        ) from None
    except Exception as e:  # noqa: BLE001 - protobuf and cryptography raise many types for a bad file
        raise ValueError(f"backend.identity: {path} is not a peer identity ({type(e).__name__}: {e})") from e
    return Identity(path=path, key=key, peer_id=peer_id, fresh=False)


def fresh_identity() -> Identity:
    """A new identity for this process only (its file is removed once the DHT has read it: ``forget``)."""
    path = Path(tempfile.mkdtemp(prefix="locoswarm-id-")) / "identity.key"
    generate(path)
    return dataclasses.replace(load(path), fresh=True)


def forget(identity: Identity) -> None:
    if identity.fresh:
        for p in (identity.path, identity.path.parent):
            try:
                os.chmod(p, 0o700)
                p.unlink() if p.is_file() else p.rmdir()
            except OSError:
                pass


@functools.lru_cache(maxsize=4096)
def writer(subkey: bytes) -> PeerID | None:
    """The peer id whose key signed a record with this subkey (None: the subkey names no owner)."""
    found = RSASignatureValidator._PUBLIC_KEY_RE.findall(subkey)
    if len(set(found)) != 1:
        return None
    try:
        public = RSAPublicKey.from_bytes(found[0])
    except Exception:  # noqa: BLE001 - not a valid key: nobody's record
        return None
    return peer_id_of(public)


def peer_id_of(public: RSAPublicKey) -> PeerID:
    """libp2p's peer id of an RSA public key: the sha2-256 multihash of its protobuf-wrapped DER encoding."""
    der = public._public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    wrapped = crypto_pb2.PublicKey(key_type=crypto_pb2.RSA, data=der).SerializeToString()
    return PeerID(multihash.encode(hashlib.sha256(wrapped).digest(), multihash.coerce_code("sha2-256")))


def read_allowed_peers(path: str | Path) -> frozenset[PeerID]:
    """``backend.allowed_peers``: one base58 peer id per line (``#`` starts a comment)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"backend.allowed_peers: {path} is not a file")
    allowed = set()
    for n, line in enumerate(path.read_text().splitlines(), start=1):
        text = line.split("#", 1)[0].strip()
        if not text:
            continue
        try:
            peer = PeerID.from_base58(text)
            if PeerID.from_base58(peer.to_base58()) != peer or not peer.to_bytes().startswith(b"\x12\x20"):
                raise ValueError("not a sha2-256 peer id")
        except Exception as e:  # noqa: BLE001
            raise ValueError(f"backend.allowed_peers: {path}:{n}: {text!r} is not a peer id ({e})") from e
        allowed.add(peer)
    if not allowed:
        raise ValueError(f"backend.allowed_peers: {path} lists no peer")
    return frozenset(allowed)


class AllowedPeersValidator(RecordValidatorBase):
    """Every DHT record must name an allowed writer in its subkey: a signed ``[owner:...]`` marker (checked by
    the RSASignatureValidator, which runs first) or a peer id (hivemind's own records; that it is the writer's
    is not proven, but such a record only points at that peer, and libp2p authenticates whoever answers)."""

    def __init__(self, allowed: frozenset[PeerID]):
        self.allowed = allowed

    def validate(self, record: DHTRecord) -> bool:
        peer = writer(record.subkey)
        if peer is None:
            try:
                subkey = MSGPackSerializer.loads(record.subkey)
                peer = PeerID(subkey) if isinstance(subkey, bytes) else None
            except Exception:  # noqa: BLE001 - not msgpack: not ours
                return False
        return peer is not None and peer in self.allowed

    @property
    def priority(self) -> int:
        return 5  # after the signature check (10), before anything that deserialises the value

    def merge_with(self, other: RecordValidatorBase) -> bool:
        return isinstance(other, AllowedPeersValidator) and other.allowed == self.allowed
