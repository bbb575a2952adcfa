"""Launch: where a process sits in a job (rank discovery) and how jobs reach a cluster (Slurm).

Owns the sbatch templates' rendering and submission and the requeue exit code. Does not train.
"""
