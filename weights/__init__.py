"""Model weights: where they live, how they are fetched, and the tiny test weights."""
