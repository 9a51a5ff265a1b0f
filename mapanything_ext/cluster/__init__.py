"""Cluster plumbing: collectives (distributed), stop signals (preemption), the run folder's lock,
Slurm job states and launcher parameters, sweep folders, fault injection for the stop-path tests."""
