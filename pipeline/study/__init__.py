"""`seg3d study`: which attention variant, with evidence. Cross-validated training of every variant on one split
(jobs.py, runner.py), out-of-fold scoring of every variant and ensemble (analysis.py), statistics and costs
(stats.py, costs.py), a report (report.py) and a champion bundle registered in MLflow (finish.py)."""
