"""steer-gguf"""
