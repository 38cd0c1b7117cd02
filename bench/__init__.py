"""Benchmarks: what the platform costs on top of the model, and how far one machine goes (`cloudach bench`)."""
