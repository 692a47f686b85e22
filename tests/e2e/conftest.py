"""End-to-end layer: the CLI doing work, child processes running rayattr or jobs, `ray job submit`, clusters, the examples."""
