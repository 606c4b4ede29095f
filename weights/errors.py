"""The one exception type for mistakes in a request's inputs.

It lives in the lowest package so that every layer (weights, lora, safety, flux) can raise it
without importing upward. Its message is shown to the user as is, so it names the input and what to do.
"""


class UserError(ValueError):
    """A request input is wrong; the message says which one and how to fix it."""
