"""HTTP adapters: FastAPI routers for /v1 (OpenAI-compatible) and /v2 (native)."""
