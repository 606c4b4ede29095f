"""Downloading untrusted URLs into an on-disk cache (used by LoRA fetching): guards, ranges, resume, checks."""
