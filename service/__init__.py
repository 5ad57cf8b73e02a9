"""The limbic service: OpenAI-compatible API, CLI and configuration."""
