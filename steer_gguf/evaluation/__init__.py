"""Measuring what a profile does: eval sets, judges, significance, the evaluation against
random-expert controls, tune and audit. Imports the core, the engine and detect."""
