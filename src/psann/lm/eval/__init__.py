"""Evaluation: held-out loss/BPB (evaluate.py), log-likelihood scoring (loglik.py), multiple choice
(mc.py), and the lm-eval adapter with offline JSONL tasks (harness.py, tasks.py; needs the eval extra)."""
