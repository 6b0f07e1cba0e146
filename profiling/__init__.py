"""Profiling and memory-versus-quality experiments for glm4v-edge.

Measuring (``profile``): an NVML/RSS memory sampler and a request timer that observe generation through the
``hooks.on_event`` callbacks of :mod:`glm4v.generate` — nothing in the hot path imports this package.
Estimating (``estimate``): a front end to :mod:`quant.estimate`. Quality (``eval``): teacher-forced KL divergence
against a reference precision and task accuracy on a deterministic synthetic visual-QA set or user JSONL sets.
``report`` joins the two into the table and plot a user picks a precision from. Method: docs/PROFILING.md.
"""
