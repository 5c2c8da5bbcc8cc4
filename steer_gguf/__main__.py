"""`python -m steer_gguf`: the same command line as `steer-gguf`."""
from .front.cli import main

if __name__ == "__main__":
    main()
