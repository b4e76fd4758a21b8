"""Build stages: each is a function from a typed config and its inputs to a typed result."""
