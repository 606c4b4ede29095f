"""Tiny randomly initialised FLUX and safety models in the real on-disk layouts, for tests and CPU demos."""
