"""`psannlm serve`: an OpenAI-compatible server with a web chat page (the `serve` extra)."""
