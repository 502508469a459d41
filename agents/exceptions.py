class BeliefStateError(Exception):
    """A stored belief state cannot be turned back into the array it was."""


class BeliefStateDecryptionError(BeliefStateError):
    """No configured key decrypts the token: wrong key, or corrupt ciphertext."""


class BeliefStateFormatError(BeliefStateError):
    """The token decrypted, but the bytes inside are not a belief array."""


class TenantShreddedError(BeliefStateDecryptionError):
    """The tenant's data keys were destroyed: what they encrypted is unreadable for good."""
