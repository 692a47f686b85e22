"""`ray job submit --working-dir . -- python jobs/retrain.py CONFIG.yaml`: fill a retrain bank (one Ray task per retrained subset)."""

from rayattr.runconfig import job_main

if __name__ == "__main__":
    job_main("retrain")
