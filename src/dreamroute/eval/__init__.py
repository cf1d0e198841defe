"""Evaluation: workloads, live runs, recordings and their replay through the same router,
metrics (APGR, CPT), reports and plots."""
