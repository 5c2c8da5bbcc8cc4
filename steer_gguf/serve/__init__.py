"""The OpenAI-compatible server: profile registry, request scheduler, completions, the HTTP app."""
