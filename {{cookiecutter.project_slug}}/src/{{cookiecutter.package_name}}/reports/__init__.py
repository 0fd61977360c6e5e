"""Reports: plots, the KL report, compare-runs and sweeps; they read what training logged."""
