"""The two-stage safety checker."""
