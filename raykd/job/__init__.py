"""What a job says: the typed schema (specs), reading and checking a YAML job with overrides
(config, typed, yaml_safe), and the user's own code a job names (factories)."""
