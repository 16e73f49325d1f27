"""The Fisher machinery: per-sample gradients, the gradient store and its writer, the plan of a
run's memory, disk and time."""
