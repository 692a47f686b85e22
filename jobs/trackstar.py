"""`ray job submit --working-dir . -- python jobs/trackstar.py CONFIG.yaml`: rayattr trackstar from a YAML run config."""

from rayattr.runconfig import job_main

if __name__ == "__main__":
    job_main("trackstar")
