"""Training: the step (step.py), the loop with its checkpoints and resume (loop.py), what the loop logs
(metrics.py) and the decisions every process takes alike between steps (step_decisions.py)."""
