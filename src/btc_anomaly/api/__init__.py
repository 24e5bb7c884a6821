"""FastAPI prediction service."""
