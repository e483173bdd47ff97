"""Chain IDs against the worked example in the spec (values cross-checked with sha256sum)."""

import pytest

from blobchain.layers.errors import InvalidArgument, NonAddressableParent
from blobchain.layers.identity import blob_id, chain_id, chain_ids, next_ids

D1, D2, D3 = ("sha256:" + c * 64 for c in "123")
B1, B2 = ("sha256:" + c * 64 for c in "ab")


def test_chain_id_empty_and_single():
    assert chain_id([]) == ""
    assert chain_id([D1]) == D1


def test_chain_id_two_and_three():
    assert chain_id([D1, D2]) == "sha256:9932074217c35353d2e03a3f5a86549f7c67bfeb0ba53e23d69f4d4c8f7958f5"
    assert chain_id([D1, D2, D3]) == "sha256:50127c0d6b338be78246434b4bce23ecf75e505158ea0bbd15effeb162fbf3ec"
    assert chain_ids([D1, D2, D3]) == [D1, chain_id([D1, D2]), chain_id([D1, D2, D3])]


def test_blob_chain_ids_worked_example():
    c1, bc1 = next_ids(None, B1, D1)
    assert c1 == D1
    assert bc1 == "sha256:5f56212580f9928e0adf551caa8a7d80008766c661fafb96ac1c8d7a8ab0bfa9"
    assert blob_id(B2, D2) == "sha256:67e9796fe73afa76db6cf7f94e24c0f1498fcf0172591e177f285b5f4cfc1dad"
    c2, bc2 = next_ids((c1, bc1), B2, D2)
    assert c2 == "sha256:9932074217c35353d2e03a3f5a86549f7c67bfeb0ba53e23d69f4d4c8f7958f5"
    assert bc2 == "sha256:49fa525a1eaf0179676e6957b7516c01f709ae8a22c90ad2120ac3d68897346d"


def test_parent_without_chain_ids_is_non_addressable():
    with pytest.raises(NonAddressableParent, match="non-addressable parent"):
        next_ids((None, None), B2, D2)
    with pytest.raises(NonAddressableParent):
        next_ids((D1, ""), B2, D2)


@pytest.mark.parametrize("bad", ["", "sha256:xyz", "sha512:" + "0" * 128, "sha256:" + "A" * 64])
def test_invalid_digests_rejected(bad):
    with pytest.raises(InvalidArgument):
        chain_id([D1, bad])
