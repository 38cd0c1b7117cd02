"""The edge: Cloudach's OpenAI-compatible HTTP/SSE API, in front of inference_svc."""
