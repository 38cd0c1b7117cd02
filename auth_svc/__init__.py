"""auth_svc: API keys, the signed internal tokens other services trust, and the keys' limits."""
