"""The HTTP boundary: the FastAPI app and its routes. The only place FastAPI is imported."""
