"""he_authors.py: the SHE-LoRA authors' packing as a measured baseline in ``he_cost.json``."""

import numpy as np
import pytest

from shelora_core.he_authors import (
    AuthorsKeys,
    AuthorsServer,
    authors_round,
    authors_row,
    pack_columns,
)
from shelora_core.he_cost import ModelShape

#: two 64 x 64 layers; budgets 1/2/5 give ciphertexts of 1, 2, and 4 + 1 columns
SHAPE = ModelShape("tiny", layers=2, modules=("q",), d=64)
RANKS, BUDGETS = (2, 4, 8), (1, 2, 5)


@pytest.fixture(scope="module")
def rounds():
    out = {}
    for bits in (24, 40):
        keys = AuthorsKeys.generate(bits)
        trace = authors_round(SHAPE.layer_shapes(), keys, ranks=RANKS, budgets=BUDGETS)
        out[bits] = (keys, trace, authors_row(SHAPE, trace, keys, ranks=RANKS, budgets=BUDGETS))
    return out


def test_pack_columns_is_four_adjacent_columns_column_major():
    cols = np.arange(3 * 5, dtype=float).reshape(3, 5)  # r = 3, k = 5

    packed = pack_columns(cols)

    assert [w for _, w in packed] == [4, 1]
    np.testing.assert_array_equal(packed[0][0], cols[:, :4].T.ravel())
    np.testing.assert_array_equal(packed[1][0], cols[:, 4])


def test_scale_2_40_is_precise_and_their_shipped_2_24_decrypts_to_noise(rounds):
    r40, r24 = rounds[40][2], rounds[24][2]

    assert r40["max_rel_error_vs_plaintext"] < 1e-3
    assert r24["max_rel_error_vs_plaintext"] > 0.1  # the finding: the products are lost
    assert (r24["method"], r40["method"]) == ("shelora-authors-2^24", "shelora-authors-2^40")
    assert r24["coeff_mod_bit_sizes"] == [60, 40, 60] and r24["poly_modulus_degree"] == 8192
    # the package's own parameter check refuses exactly the shipped scale
    assert r40["package_check"] is None
    assert "2^24" in r24["package_check"]


def test_bytes_are_the_serialized_messages(rounds):
    keys, trace, row = rounds[40]

    # Assert: ciphertexts up = ceil(k_i / 4) per layer; bytes = len() of what was sent
    per_client = [sum(len(v) for v in u.values()) for u in trace.uploads]
    assert per_client == [-(-k // 4) * 2 for k in BUDGETS]
    cipher_up = [sum(len(b) for v in u.values() for b, _ in v) for u in trace.uploads]
    assert row["upload_cipher_bytes"] == pytest.approx(np.mean(cipher_up))
    plain_up = [len(u) for u in trace.plain.uploads]
    assert row["upload_bytes"] == pytest.approx(np.mean(plain_up) + np.mean(cipher_up))
    down = [b for blobs in trace.summed.values() for b in blobs]
    assert len(down) == max(BUDGETS) * 2  # one column of m values per (layer, position)
    assert row["download_bytes"] == len(trace.plain.broadcast) + sum(len(b) for b in down)
    assert row["key_bytes_server"] == len(keys.public)
    assert not row["scaled_from_layers"]


def test_server_holds_no_secret_key(rounds):
    keys, trace, _ = rounds[40]
    server = AuthorsServer(keys.public)

    assert not server.context.is_private()
    import tenseal as ts

    vec = ts.ckks_vector_from(server.context, trace.summed["layers.0.q"][0])
    with pytest.raises(ValueError, match="secret"):
        vec.decrypt()
    with pytest.raises(ValueError, match="secret key"):
        AuthorsServer(keys.secret)


def test_cost_notes_bullet_is_computed_from_the_rows(rounds):
    from reproduce import cost_notes

    r24, r40 = rounds[24][2], rounds[40][2]
    ours = {"method": "shelora-paper", "model": "tiny", "upload_bytes": 3 * r40["upload_bytes"],
            "client_upload_seconds": 2 * r40["client_upload_seconds"],
            "server_seconds_per_round": r40["server_seconds_per_round"] / 4}  # fmt: skip

    notes = "\n".join(cost_notes({"rows": [ours, r24, r40]}))

    assert "**The authors' packing** (4 A columns per ciphertext, N = 8192, [60, 40, 60]" in notes
    assert "our paper mode / theirs: 3.0x" in notes and "theirs / ours: 4.0x" in notes
    assert f"{r24['max_rel_error_vs_plaintext']:.1e} at scale 2^24" in notes
    assert "At 2^24 the products are lost" in notes
