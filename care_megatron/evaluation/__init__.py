"""care_megatron.evaluation: evaluation of a policy, one greedy decode per question or (``eval.protocol: paper``)
``eval.seeds`` seeded sampled decodes.

``scoring`` / ``run.run_evaluation``: the training mixture's held-out split (also used during training);
``benchmarks``: the paper's six benchmarks, read from their releases and scored by their official rules;
``benchmark_eval`` / ``run.run_benchmark_evaluation``: ``care-eval --benchmarks``, with per-example
JSONL, resume, bootstrap intervals (and t-intervals over seeds), the paper's Table 1 layout and a chart.
"""
