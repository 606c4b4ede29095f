"""The project's two error types for things a request runs into. Every layer may import this module; it imports
nothing of ours.

Both messages are shown to the user as they are, so they name the input and what to do, and never a token, a
signed URL's query string or a server-side path.
"""


class UserError(ValueError):
    """A request input is wrong; the message says which one and how to fix it."""


class UpstreamError(RuntimeError):
    """A host we fetch from failed (5xx, timeout, connection lost): not the user's fault; the same request may
    work later. The message names the input and the host."""
