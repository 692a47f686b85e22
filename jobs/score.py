"""`ray job submit --working-dir . -- python jobs/score.py CONFIG.yaml`: rayattr score from a YAML run config."""

from rayattr.runconfig import job_main

if __name__ == "__main__":
    job_main("score")
