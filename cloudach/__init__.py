"""Cloudach: shared platform code, the generated gRPC stubs and the `cloudach` command."""
