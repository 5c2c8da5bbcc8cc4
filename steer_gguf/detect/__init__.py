"""Finding behavior-linked experts: pair datasets, routing statistics, risk difference,
and causal detection. Imports only the core and the engine."""
