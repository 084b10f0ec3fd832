"""llm-edge-proxy: an OpenAI-compatible LLM gateway for gunicorn on bare-metal hosts."""

__version__ = "0.1.0"
