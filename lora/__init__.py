"""LoRA: sources, formats, applying and unloading."""
