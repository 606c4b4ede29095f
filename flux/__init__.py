"""Generation: sizes, requests, pipelines, output encoding."""
