"""Writing a profile into the model file, so stock llama.cpp, Ollama and LM Studio route as
the profile says with no patch: plan (what can be baked, and how exactly), write (the GGUF
copy), check (the baked file against the steered source). Imports the core, the engine and
evaluation (for the check's texts)."""
