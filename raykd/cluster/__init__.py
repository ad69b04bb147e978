"""Where a job runs: starting or joining Ray (ray_env, local_head), submitting to a cluster
(submit), and storage every node shares (storage). Imports nothing here: raykd's package import
sets Ray's environment before anything imports ray."""
