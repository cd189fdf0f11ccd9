"""The agent's two kinds of failure.

``ConfigError`` is permanent: bad input (a flag, the keys file, the node
description). The agent reports it and keeps the last good datapath; retrying
does not help until the input changes.

``KernelError`` is retryable: the kernel refused or failed a netlink request.
Its message names the object (SA dst/spi/reqid, policy direction/selector)
and the kernel's reason, never key material.
"""

from __future__ import annotations


class SealnetError(Exception):
    """Base class of the agent's own errors."""


class ConfigError(SealnetError):
    """Invalid input; permanent until the input changes."""


class KernelError(SealnetError):
    """A kernel operation failed; the caller may retry."""

    def __init__(self, message: str, errno: int | None = None) -> None:
        super().__init__(message)
        self.errno = errno
