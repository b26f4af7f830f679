"""The HTTP side: an OpenAI-compatible server and upstream client on anyio + h11."""
