"""The wire: messages round-trip through bytes and every corruption is refused."""

import numpy as np
import pytest

from shelora_core.messages import Message, MessageError, decode, encode


def _msg():
    rng = np.random.default_rng(0)
    return Message(
        "upload",
        {"method": "flexlora", "round": 3, "client_id": 7},
        {
            "layer|A": rng.normal(size=(4, 6)).astype(np.float32),
            "layer|B": np.zeros((5, 4), np.float32),
        },
    )


def test_message_roundtrips_header_and_tensors_exactly():
    msg = _msg()
    back = decode(encode(msg), expect_kind="upload")
    assert back.kind == "upload" and back.header == msg.header
    for k, v in msg.tensors.items():
        np.testing.assert_array_equal(back.tensors[k], v)


def test_cost_is_the_length_of_the_bytes_and_close_to_the_payload():
    data = encode(_msg())
    payload = (4 * 6 + 5 * 4) * 4
    assert payload < len(data) < payload + 400  # header overhead only


@pytest.mark.parametrize("cut", [0, 10, 50, -1])
def test_truncated_message_is_refused(cut):
    data = encode(_msg())
    with pytest.raises(MessageError, match="truncated"):
        decode(data[:cut])


def test_flipped_byte_is_refused_as_corrupted():
    data = bytearray(encode(_msg()))
    data[-3] ^= 0xFF
    with pytest.raises(MessageError, match="corrupted"):
        decode(bytes(data))


def test_wrong_magic_version_and_kind_are_refused():
    data = encode(_msg())
    with pytest.raises(MessageError, match="not a shelora message"):
        decode(b"XXXX" + data[4:])
    with pytest.raises(MessageError, match="protocol version 9"):
        decode(data[:4] + (9).to_bytes(2, "little") + data[6:])
    with pytest.raises(MessageError, match="expected a 'broadcast'"):
        decode(data, expect_kind="broadcast")


def test_nan_and_inf_are_refused():
    msg = _msg()
    msg.tensors["layer|A"][0, 0] = np.nan
    with pytest.raises(MessageError, match="NaN/Inf"):
        decode(encode(msg))


def test_non_bytes_input_is_refused():
    with pytest.raises(MessageError, match="expected bytes"):
        decode("hello")  # type: ignore[arg-type]
