"""Evaluation: closed-loop rollouts, offline action error, FLOPs, latency and reports."""
