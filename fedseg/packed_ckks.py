"""Packed CKKS model updates: a whole model in one flat encrypted vector. No NVFlare here.

A site flattens its weighted model into one vector (the layout header records every tensor's
name, shape and dtype), encrypts it in full CKKS ciphertexts and serializes them in SEAL's seeded
form: a symmetric ciphertext's second polynomial is pseudo-random, so only its seed travels. No
TenSEAL context travels: sites and server load theirs from their provisioned startup kits.

The server only adds ciphertexts (no multiplication), so the parameters need no multiplicative
level: one data prime and the key-switching prime (for example poly modulus 4096 with
``[60, 40]``), which is what :func:`check_parameters` accepts for the packed path. The weighted
average is finished at the sites: the aggregate carries the sum of the weights in its header, and
a site divides by it after decrypting.

Keys and parameters come from TenSEAL context files as NVFlare's ``HEBuilder`` writes them
(``client_context.tenseal`` with the secret key, ``server_context.tenseal`` without), read here
into SEAL objects of ``tenseal.sealapi``.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tenseal import sealapi

#: Magic bytes at the start of every packed message.
MAGIC = b"FSCKKS1\n"
#: Format version of the header.
FORMAT_VERSION = 1
#: The most sites whose weighted values one aggregate must hold without overflow.
MAX_SITES = 64


class PackedCkksError(ValueError):
    """A packed message or context that cannot be used; the message says why."""


class WeightedOverflowError(PackedCkksError):
    """An update whose values times its weight could overflow the aggregate of the context."""


@dataclass(frozen=True)
class TensorSpec:
    """One tensor of the model: its name, shape and dtype."""

    name: str
    shape: tuple[int, ...]
    dtype: str

    @property
    def size(self) -> int:
        """Number of values."""
        return math.prod(self.shape)


@dataclass(frozen=True)
class Layout:
    """Where each tensor lies in the flat vector (tensors in name order)."""

    tensors: tuple[TensorSpec, ...]

    @classmethod
    def of(cls, weights: Mapping[str, np.ndarray]) -> Layout:
        """The layout of a model's weights (name order, so every site agrees)."""
        return cls(
            tuple(
                TensorSpec(
                    name, tuple(int(n) for n in np.shape(weights[name])), _dtype(weights[name])
                )
                for name in sorted(weights)
            )
        )

    @classmethod
    def from_json(cls, document: Sequence) -> Layout:
        """Reads the header form (a list of ``[name, shape, dtype]``)."""
        return cls(
            tuple(
                TensorSpec(str(n), tuple(int(s) for s in shape), str(d)) for n, shape, d in document
            )
        )

    def to_json(self) -> list:
        """Header form: a list of ``[name, shape, dtype]``."""
        return [[t.name, list(t.shape), t.dtype] for t in self.tensors]

    @property
    def size(self) -> int:
        """Number of values in all tensors."""
        return sum(t.size for t in self.tensors)

    @property
    def digest(self) -> str:
        """SHA-256 of the layout: sites and server check that they agree on it."""
        return hashlib.sha256(json.dumps(self.to_json()).encode()).hexdigest()

    def flatten(self, weights: Mapping[str, np.ndarray]) -> np.ndarray:
        """The weights as one float64 vector.

        Raises:
            PackedCkksError: If the weights do not have this layout.
        """
        if Layout.of(weights) != self:
            raise PackedCkksError("the weights do not match the layout (names, shapes or dtypes)")
        return np.concatenate(
            [np.asarray(weights[t.name], dtype=np.float64).ravel() for t in self.tensors]
        )

    def unflatten(self, vector: np.ndarray) -> dict[str, np.ndarray]:
        """Splits a flat vector back into named tensors of their own dtype."""
        if vector.size < self.size:
            raise PackedCkksError(f"{vector.size} values for a layout of {self.size}")
        weights, offset = {}, 0
        for tensor in self.tensors:
            values = vector[offset : offset + tensor.size].reshape(tensor.shape)
            if np.dtype(tensor.dtype).kind in "iub":
                values = np.rint(values)
            weights[tensor.name] = values.astype(tensor.dtype)
            offset += tensor.size
        return weights


@dataclass(frozen=True)
class PackedMessage:
    """A decoded packed message: its header and its serialized ciphertexts."""

    header: dict
    ciphertexts: tuple[bytes, ...]

    @property
    def layout(self) -> Layout:
        """The tensors the vector holds."""
        return Layout.from_json(self.header["layout"])

    def to_bytes(self) -> bytes:
        """``MAGIC``, header length (4 bytes, little endian), JSON header, ciphertexts."""
        header = {**self.header, "ciphertext_sizes": [len(c) for c in self.ciphertexts]}
        encoded = json.dumps(header, sort_keys=True).encode()
        return b"".join((MAGIC, struct.pack("<I", len(encoded)), encoded, *self.ciphertexts))

    @classmethod
    def from_bytes(cls, blob: bytes) -> PackedMessage:
        """Parses a message written by :meth:`to_bytes`.

        Raises:
            PackedCkksError: If it is not a packed message of this format, or is truncated.
        """
        if not isinstance(blob, bytes | bytearray) or not blob.startswith(MAGIC):
            raise PackedCkksError("not a packed CKKS message")
        start = len(MAGIC) + 4
        try:
            (length,) = struct.unpack_from("<I", blob, len(MAGIC))
            header = json.loads(bytes(blob[start : start + length]))
        except (struct.error, ValueError) as error:
            raise PackedCkksError(f"unreadable packed CKKS header ({error})") from error
        if header.get("format") != FORMAT_VERSION:
            raise PackedCkksError(
                f"packed CKKS format {header.get('format')}, expected {FORMAT_VERSION}"
            )
        offset, ciphertexts = start + length, []
        for size in header["ciphertext_sizes"]:
            ciphertexts.append(bytes(blob[offset : offset + size]))
            offset += size
        if offset != len(blob):
            raise PackedCkksError(f"packed CKKS message of {len(blob)} bytes, header says {offset}")
        return cls(header, tuple(ciphertexts))


class CkksKeys:
    """SEAL parameters and, at a site, the secret key, read from a provisioned TenSEAL context.

    Args:
        context_bytes: A serialized TenSEAL context (``client_context.tenseal`` or
            ``server_context.tenseal`` from provisioning).

    Raises:
        PackedCkksError: If the context is not a CKKS context SEAL accepts at 128-bit security.
    """

    def __init__(self, context_bytes: bytes):
        fields = _protobuf_fields(context_bytes)
        if 1 not in fields:
            raise PackedCkksError("not a TenSEAL context (no encryption parameters)")
        public = _protobuf_fields(fields.get(2, b""))
        private = _protobuf_fields(fields.get(3, b""))
        self.parameters = _seal_load(
            sealapi.EncryptionParameters(sealapi.SCHEME_TYPE.CKKS), None, fields[1]
        )
        if self.parameters.scheme() != sealapi.SCHEME_TYPE.CKKS:
            raise PackedCkksError("the context is not a CKKS context")
        self.context = sealapi.SEALContext(self.parameters, True, sealapi.SEC_LEVEL_TYPE.TC128)
        if not self.context.parameters_set():
            raise PackedCkksError(
                "SEAL refuses the context's parameters at 128-bit security: "
                + self.context.parameters_error_message()
            )
        self.scale = struct.unpack("<d", public[3])[0] if 3 in public else 0.0
        if not self.scale > 1.0:
            raise PackedCkksError("the context has no global scale")
        self.encoder = sealapi.CKKSEncoder(self.context)
        self.evaluator = sealapi.Evaluator(self.context)
        self.parameters_id = hashlib.sha256(fields[1]).hexdigest()[:16]
        self._secret_key = None
        self.key_id = None
        if 1 in private:
            self._secret_key = _seal_load(sealapi.SecretKey(), self.context, private[1])
            self.key_id = hashlib.sha256(b"fedseg key id\0" + private[1]).hexdigest()[:16]

    @classmethod
    def from_file(cls, path: Path) -> CkksKeys:
        """Reads a context file."""
        return cls(Path(path).read_bytes())

    @property
    def slots(self) -> int:
        """Values per ciphertext."""
        return self.encoder.slot_count()

    @property
    def data_primes(self) -> list[int]:
        """Bit sizes of the primes a fresh ciphertext carries (the key-switching prime excluded)."""
        data = self.context.first_context_data().parms().coeff_modulus()
        return [prime.bit_count() for prime in data]

    @property
    def can_decrypt(self) -> bool:
        """Whether this context holds the secret key (sites do, the server never)."""
        return self._secret_key is not None

    def encrypt(self, vector: np.ndarray) -> list[bytes]:
        """Encrypts a vector slot-packed into full ciphertexts, in SEAL's seeded form.

        Raises:
            PackedCkksError: Without the secret key (contexts from provisioning are symmetric).
        """
        encryptor = sealapi.Encryptor(self.context, self._require_secret_key())
        ciphertexts = []
        with _SealBuffer() as buffer:
            for start in range(0, vector.size, self.slots):
                plaintext = sealapi.Plaintext()
                self.encoder.encode(
                    vector[start : start + self.slots].tolist(), self.scale, plaintext
                )
                ciphertexts.append(buffer.save(encryptor.encrypt_symmetric(plaintext)))
        return ciphertexts

    def load(self, ciphertexts: Iterable[bytes]) -> list:
        """Loads serialized ciphertexts (checked against these parameters)."""
        loaded = []
        with _SealBuffer() as buffer:
            for serialized in ciphertexts:
                ciphertext = sealapi.Ciphertext()
                buffer.load(ciphertext, self.context, serialized)
                loaded.append(ciphertext)
        return loaded

    def save(self, ciphertexts: Iterable) -> list[bytes]:
        """Serializes ciphertexts."""
        with _SealBuffer() as buffer:
            return [buffer.save(ciphertext) for ciphertext in ciphertexts]

    def decrypt(self, ciphertexts: Iterable[bytes]) -> np.ndarray:
        """Decrypts and decodes serialized ciphertexts into one flat vector."""
        decryptor = sealapi.Decryptor(self.context, self._require_secret_key())
        parts = []
        for ciphertext in self.load(ciphertexts):
            plaintext = sealapi.Plaintext()
            decryptor.decrypt(ciphertext, plaintext)
            parts.append(np.asarray(self.encoder.decode_double(plaintext), dtype=np.float64))
        return np.concatenate(parts) if parts else np.zeros(0)

    def _require_secret_key(self):
        if self._secret_key is None:
            raise PackedCkksError("this context holds no secret key: it cannot encrypt or decrypt")
        return self._secret_key


def check_parameters(keys: CkksKeys) -> None:
    """Checks that a context suits packed updates (any depth works; one data prime is enough).

    Raises:
        PackedCkksError: If values at the context's scale would overflow the data prime.
    """
    headroom = keys.data_primes[0] - 1 - math.log2(keys.scale)
    if headroom < 8:
        raise PackedCkksError(
            f"the context's first prime ({keys.data_primes[0]} bits) leaves {headroom:.0f} bits "
            f"above its scale (2^{math.log2(keys.scale):.0f}); provision a scale at least 8 bits "
            "below the first prime"
        )


def encrypt_update(keys: CkksKeys, weights: Mapping[str, np.ndarray], weight: float) -> bytes:
    """One site's contribution: its weights times ``weight``, packed and encrypted.

    Args:
        keys: The site's keys (with the secret key).
        weights: The model (every value finite).
        weight: Its aggregation weight (for example the local training steps).

    Returns:
        The packed message.

    Raises:
        PackedCkksError: If a value is not finite.
        WeightedOverflowError: If the weighted values could overflow an aggregate of
            :data:`MAX_SITES` sites.
    """
    layout = Layout.of(weights)
    vector = layout.flatten(weights) * float(weight)
    if not np.all(np.isfinite(vector)):
        bad = [t.name for t in layout.tensors if not np.all(np.isfinite(weights[t.name]))]
        raise PackedCkksError(f"refusing to encrypt non-finite values (in {', '.join(bad)})")
    limit = 2.0 ** (keys.data_primes[0] - 2) / keys.scale / MAX_SITES
    largest = float(np.abs(vector).max()) if vector.size else 0.0
    if largest >= limit:
        raise WeightedOverflowError(
            f"weighted value {largest:.3g} (weight {weight:g} times a value of "
            f"{largest / weight:.3g}) could overflow an aggregate of {MAX_SITES} sites (limit "
            f"{limit:.3g}): provision a smaller scale or a larger first prime"
        )
    header = {
        "format": FORMAT_VERSION,
        "parameters_id": keys.parameters_id,
        "key_id": keys.key_id,
        "layout": layout.to_json(),
        "layout_digest": layout.digest,
        "weight": float(weight),
        "contributions": 1,
    }
    return PackedMessage(header, tuple(keys.encrypt(vector))).to_bytes()


class EncryptedSum:
    """Adds packed contributions as they arrive; needs no secret key (the server's side).

    Args:
        keys: The server's keys (parameters only).
    """

    def __init__(self, keys: CkksKeys):
        self.keys = keys
        self.header: dict | None = None
        self.ciphertexts: list = []

    @property
    def contributions(self) -> int:
        """How many contributions were added."""
        return self.header["contributions"] if self.header else 0

    def add(self, blob: bytes) -> None:
        """Adds one contribution.

        Raises:
            PackedCkksError: If it is not a packed message for these parameters, or its layout or
                key differs from the contributions already added.
        """
        message = PackedMessage.from_bytes(blob)
        header = message.header
        if header["parameters_id"] != self.keys.parameters_id:
            raise PackedCkksError(
                f"encrypted with other HE parameters ({header['parameters_id']}, this "
                f"federation uses {self.keys.parameters_id}): the site's startup kit is from "
                "another provisioning"
            )
        incoming = self.keys.load(message.ciphertexts)
        if self.header is None:
            self.header, self.ciphertexts = dict(header), incoming
            return
        for key in ("layout_digest", "key_id"):
            if header[key] != self.header[key]:
                raise PackedCkksError(
                    f"{key} {header[key]} differs from the other contributions' {self.header[key]}"
                )
        if len(incoming) != len(self.ciphertexts):
            raise PackedCkksError("a contribution with another number of ciphertexts")
        for total, ciphertext in zip(self.ciphertexts, incoming, strict=True):
            self.keys.evaluator.add_inplace(total, ciphertext)
        self.header["weight"] += header["weight"]
        self.header["contributions"] += header["contributions"]

    def to_bytes(self) -> bytes:
        """The aggregate as a packed message (its weight is the sum of the weights).

        Raises:
            PackedCkksError: If nothing was added.
        """
        if self.header is None:
            raise PackedCkksError("no contribution to aggregate")
        return PackedMessage(self.header, tuple(self.keys.save(self.ciphertexts))).to_bytes()


def decrypt_model(keys: CkksKeys, blob: bytes) -> dict[str, np.ndarray]:
    """Decrypts a packed message and divides by its weight: the weighted average.

    Raises:
        PackedCkksError: If it was encrypted under other parameters or another key, or the
            result holds non-finite values.
    """
    message = PackedMessage.from_bytes(blob)
    header = message.header
    if header["parameters_id"] != keys.parameters_id or header["key_id"] != keys.key_id:
        raise PackedCkksError(
            "the model was encrypted under another HE context (parameters "
            f"{header['parameters_id']}, key {header['key_id']}; this site has "
            f"{keys.parameters_id}, {keys.key_id}): this site's startup kit is from another "
            "provisioning"
        )
    layout = message.layout
    vector = keys.decrypt(message.ciphertexts)[: layout.size] / header["weight"]
    if not np.all(np.isfinite(vector)):
        raise PackedCkksError("the decrypted model holds non-finite values")
    return layout.unflatten(vector)


def _dtype(array) -> str:
    return np.asarray(array).dtype.str


class _SealBuffer:
    """A file path SEAL's save/load can use, kept in memory (``tenseal.sealapi`` takes paths)."""

    def __enter__(self) -> _SealBuffer:
        if hasattr(os, "memfd_create"):
            self._fd = os.memfd_create("fedseg-seal")
            self._directory = None
            self.path = f"/proc/self/fd/{self._fd}"
        else:
            self._directory = tempfile.TemporaryDirectory(prefix="fedseg-seal-")
            self.path = os.path.join(self._directory.name, "buffer")
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        return self

    def __exit__(self, *exc_info) -> None:
        os.close(self._fd)
        if self._directory is not None:
            self._directory.cleanup()

    def save(self, serializable) -> bytes:
        serializable.save(self.path)
        size = os.fstat(self._fd).st_size
        return os.pread(self._fd, size, 0)

    def load(self, target, context, data: bytes) -> None:
        """Loads ``data`` into a SEAL object (``context`` is ``None`` for parameters)."""
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, data, 0)
        try:
            if context is None:
                target.load(self.path)
            else:
                target.load(context, self.path)
        except (ValueError, RuntimeError) as error:
            raise PackedCkksError(f"unreadable SEAL object ({error})") from error


def _seal_load(target, context, data: bytes):
    with _SealBuffer() as buffer:
        buffer.load(target, context, data)
    return target


def _protobuf_fields(buffer: bytes) -> dict[int, bytes | int]:
    """Top-level fields of a protobuf message (the TenSEAL context format; last one wins)."""
    fields, position = {}, 0

    def varint() -> int:
        nonlocal position
        value, shift = 0, 0
        while True:
            if position >= len(buffer):
                raise PackedCkksError("truncated TenSEAL context")
            byte = buffer[position]
            position += 1
            value |= (byte & 0x7F) << shift
            shift += 7
            if byte < 0x80:
                return value

    while position < len(buffer):
        key = varint()
        number, wire_type = key >> 3, key & 7
        if wire_type == 0:
            fields[number] = varint()
        elif wire_type == 2:
            length = varint()
            fields[number] = bytes(buffer[position : position + length])
            position += length
        elif wire_type in (1, 5):
            width = 8 if wire_type == 1 else 4
            fields[number] = bytes(buffer[position : position + width])
            position += width
        else:
            raise PackedCkksError(f"not a TenSEAL context (protobuf wire type {wire_type})")
    return fields
