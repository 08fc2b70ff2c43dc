"""Packed CKKS updates with real provisioned contexts: correctness, refusals, wire format."""

import math

import numpy as np
import pytest
import tenseal as ts

from fedseg.packed_ckks import (
    MAGIC,
    CkksKeys,
    EncryptedSum,
    Layout,
    PackedCkksError,
    PackedMessage,
    check_parameters,
    decrypt_model,
    encrypt_update,
)


def model(seed: int, scale: float = 0.1) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "conv.weight": (rng.normal(size=(8, 4, 3, 3, 3)) * scale).astype(np.float32),
        "conv.bias": (rng.normal(size=8) * scale).astype(np.float32),
        "norm.weight": (1 + rng.normal(size=8) * scale).astype(np.float32),
        "counter": np.array(seed * 10, dtype=np.int64),
    }


def weighted_average(models, weights):
    return {
        k: sum(m[k].astype(np.float64) * w for m, w in zip(models, weights, strict=True))
        / sum(weights)
        for k in models[0]
    }


def test_the_server_context_holds_no_secret_key(provisioned, packed_keys):
    client, server = packed_keys
    assert client.can_decrypt and not server.can_decrypt
    assert not ts.context_from(provisioned["packed"]["server"].read_bytes()).has_secret_key()
    blob = encrypt_update(client, model(1), 1.0)
    with pytest.raises(PackedCkksError, match="holds no secret key"):
        server.decrypt(PackedMessage.from_bytes(blob).ciphertexts)
    with pytest.raises(PackedCkksError, match="holds no secret key"):
        encrypt_update(server, model(1), 1.0)


def test_sites_of_one_federation_share_the_key_and_the_server_the_parameters(provisioned):
    one = CkksKeys.from_file(provisioned["packed"]["client"])
    two = CkksKeys.from_file(provisioned["packed"]["client-2"])
    server = CkksKeys.from_file(provisioned["packed"]["server"])
    assert one.key_id == two.key_id and server.key_id is None
    assert one.parameters_id == server.parameters_id
    other = CkksKeys.from_file(provisioned["stock"]["client"])
    assert other.parameters_id != one.parameters_id and other.key_id != one.key_id


def test_parameters_are_128_bit_secure_with_one_data_prime(packed_keys):
    client, _ = packed_keys
    context = client.context
    total = context.key_context_data().total_coeff_modulus_bit_count()
    assert client.slots == 2048 and client.data_primes == [60] and total == 100
    # HE standard (homomorphicencryption.org), 128-bit classical, N = 4096: log q <= 109.
    assert total <= 109
    check_parameters(client)


def test_the_aggregate_is_the_weighted_average(packed_keys):
    client, server = packed_keys
    models, weights = [model(s) for s in (1, 2, 3)], [8.0, 4.0, 12.0]
    total = EncryptedSum(server)
    for m, w in zip(models, weights, strict=True):
        total.add(encrypt_update(client, m, w))
    assert total.contributions == 3
    result = decrypt_model(client, total.to_bytes())
    expected = weighted_average(models, weights)
    assert set(result) == set(expected)
    for name, values in result.items():
        assert values.dtype == models[0][name].dtype and values.shape == models[0][name].shape
        if name != "counter":
            np.testing.assert_allclose(values, expected[name], rtol=0, atol=1e-6)
    assert result["counter"] == round(expected["counter"]) == 22  # integers stay integers


def test_a_large_model_spans_several_ciphertexts_and_nothing_is_lost(packed_keys):
    client, server = packed_keys
    big = {"a": np.linspace(-1, 1, 5000, dtype=np.float32), "b": np.ones(3, np.float32)}
    blob = encrypt_update(client, big, 2.0)
    message = PackedMessage.from_bytes(blob)
    assert len(message.ciphertexts) == math.ceil(5003 / client.slots)
    total = EncryptedSum(server)
    total.add(blob)
    result = decrypt_model(client, total.to_bytes())
    np.testing.assert_allclose(result["a"], big["a"], atol=1e-6)
    np.testing.assert_allclose(result["b"], 1.0, atol=1e-6)


def test_uploads_are_compact_and_carry_no_context(packed_keys, provisioned):
    client, _ = packed_keys
    weights = {"w": np.random.default_rng(0).normal(size=100_000).astype(np.float32)}
    blob = encrypt_update(client, weights, 1.0)
    assert blob.startswith(MAGIC)
    # Seeded ciphertexts: about 16 bytes per value (float32 is 4), nothing of the context.
    assert len(blob) / 100_000 < 17.5
    context = provisioned["packed"]["client"].read_bytes()
    assert context[1000:1064] not in blob


def test_refusals_name_the_problem(packed_keys, provisioned):
    client, server = packed_keys
    broken = model(1)
    broken["conv.bias"][3] = np.nan
    with pytest.raises(PackedCkksError, match=r"non-finite values \(in conv.bias\)"):
        encrypt_update(client, broken, 1.0)
    with pytest.raises(PackedCkksError, match="could overflow"):
        encrypt_update(client, {"w": np.full(4, 1e6, np.float32)}, 10.0)
    foreign = CkksKeys.from_file(provisioned["stock"]["client"])
    total = EncryptedSum(server)
    with pytest.raises(PackedCkksError, match="other HE parameters"):
        total.add(encrypt_update(foreign, model(1), 1.0))
    total.add(encrypt_update(client, model(1), 1.0))
    with pytest.raises(PackedCkksError, match="layout_digest"):
        total.add(encrypt_update(client, {"other": np.ones(3, np.float32)}, 1.0))
    with pytest.raises(PackedCkksError, match="another HE context"):
        decrypt_model(foreign, total.to_bytes())
    with pytest.raises(PackedCkksError, match="not a packed CKKS message"):
        PackedMessage.from_bytes(b"plaintext")
    truncated = encrypt_update(client, model(1), 1.0)[:-10]
    with pytest.raises(PackedCkksError, match="header says"):
        PackedMessage.from_bytes(truncated)
    with pytest.raises(PackedCkksError, match="no contribution"):
        EncryptedSum(server).to_bytes()


def test_layout_round_trip_and_mismatch():
    weights = model(4)
    layout = Layout.of(weights)
    assert [t.name for t in layout.tensors] == sorted(weights)
    assert Layout.from_json(layout.to_json()) == layout
    restored = layout.unflatten(layout.flatten(weights))
    for name in weights:
        np.testing.assert_array_equal(restored[name], weights[name])
    with pytest.raises(PackedCkksError, match="do not match the layout"):
        layout.flatten({**weights, "conv.bias": np.zeros(9, np.float32)})
