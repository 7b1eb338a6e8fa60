"""ollama-proxy: a drop-in reverse proxy and load balancer for a fleet of Ollama servers."""

__version__ = "0.1.0"
