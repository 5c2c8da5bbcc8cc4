"""What a person runs: the CLI (arguments only), the chat REPL, the demo, plots and progress bars."""
