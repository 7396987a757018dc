"""Grading responses: the answer after `</think>`, compared as strings, numbers or symbols.

  answers.py  `extract_answer`, `grade`, `grade_batch` (the answer formats: paper, lenient)
  pool.py     the symbolic step (math-verify) in worker processes bounded by timeouts
  hosts.py    grading over the hosts of a pod: disjoint shares, gathered verdicts
"""
