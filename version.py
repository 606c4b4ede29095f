"""The project's name and version, defined once: images written with FLUX_WRITE_METADATA carry them
(flux/metadata.py). Bump VERSION when a change alters what a request produces or accepts. Imports nothing."""

NAME = "flux-lora-cog"
VERSION = "0.1.0"
