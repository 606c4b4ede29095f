"""Byte units, defined once for every layer (it imports nothing). Sizes shown to people are decimal, as hosts
and disks state them (MB, GB); buffers, chunks and memory are binary (KiB, MiB, GiB)."""

KB = 10**3
MB = 10**6
GB = 10**9

KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30
