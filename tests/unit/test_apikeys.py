"""The key format's checksum: a new key carries one, a mistyped one fails it, an old key has none."""

import secrets

from cloudach.apikeys import CHECKSUMMED_LENGTH, checksum_verdict, new_api_key


def test_new_keys_carry_a_checksum_that_a_typo_breaks():
    key = new_api_key()
    assert key.startswith("ck-") and len(key) == CHECKSUMMED_LENGTH and checksum_verdict(key) is True
    typo = key[:10] + ("A" if key[10] != "A" else "B") + key[11:]
    assert checksum_verdict(typo) is False
    random_ones = ["ck-" + secrets.token_urlsafe(36)[:49] for _ in range(200)]
    assert sum(checksum_verdict(k) is True for k in random_ones) == 0


def test_keys_of_the_older_shape_are_left_to_a_lookup():
    assert checksum_verdict("ck-" + secrets.token_urlsafe(32)) is None  # made before checksums
    assert checksum_verdict("sk-something-else") is None
