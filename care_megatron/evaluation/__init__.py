"""care_megatron.evaluation: single-decode evaluation of a policy.

``scoring`` / ``run.run_evaluation``: the training mixture's held-out split (also used during training);
``benchmarks``: the paper's six benchmarks, read from their releases and scored by their official rules;
``benchmark_eval`` / ``run.run_benchmark_evaluation``: ``care-eval --benchmarks``, with per-example
JSONL, resume, bootstrap intervals, the paper's Table 1 layout and a chart.
"""
