"""The package's one error (no torch, so the API can raise and catch it too)."""


class AdapterError(ValueError):
    """An adapter file or request that cannot be used; the message names what is wrong."""
