"""go_fast: fp8 FLUX transformers (torchao), LoRAs on fp8 weights, and (on CUDA) torch.compile."""
