"""Run directories: checkpoints (checkpoint.py), the validated plan of a run (plan.py), and runs derived from
others: branch, extend, upcycle, untie-head (derive.py holds the one rule)."""
