"""Synthetic FLUX.1 weights: the real architecture and configs, random values, any number of layers.

- components.py: the seven models of a weights folder (two transformers, CLIP, T5, VAE, two safety stages),
  each built on the meta device from weights/real_configs.py, and how each is stored;
- values.py: every tensor's value, a pure function of (seed, component, tensor name);
- shards.py: the streaming safetensors writer, sharded as the libraries shard;
- folder.py: a whole folder laid out as FLUX_WEIGHTS_DIR expects (script/synthetic_weights);
- modules.py: the same models straight in memory on a device, with no files (script/gpu_check).
"""
