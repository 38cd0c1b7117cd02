"""Cloudach's shared library: errors, gRPC plumbing, tokens, the database layer, settings and
telemetry, and the generated stubs. It imports nothing from the services or the tools above it."""
