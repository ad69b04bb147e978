"""Running a job on Ray from its driver: planning units (plan, units), launching them in
dependency order (scheduler), the job run itself (pipeline), one driver per run folder
(ownership)."""
