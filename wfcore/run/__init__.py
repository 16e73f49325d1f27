"""The run machinery: a run's setup and steps (pipeline, pruning, prepare), the Runner over a
schedule, its directory, checkpoints and report, and what keeps a step safe (safeguard,
BatchNorm statistics, degeneration, admission)."""
