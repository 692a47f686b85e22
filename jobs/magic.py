"""`ray job submit --working-dir . -- python jobs/magic.py CONFIG.yaml`: MAGIC metagradient scores (one Ray task per query group)."""

from rayattr.runconfig import job_main

if __name__ == "__main__":
    job_main("magic")
