"""`ray job submit --working-dir . -- python jobs/reduce.py CONFIG.yaml`: rayattr reduce from a YAML run config."""

from rayattr.runconfig import job_main

if __name__ == "__main__":
    job_main("reduce")
