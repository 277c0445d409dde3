"""The training loop as components: train state, batch source, step, evaluator, cadence, and the schedule (fit)."""
