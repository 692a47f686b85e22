"""`ray job submit --working-dir . -- python jobs/train.py CONFIG.yaml`: fine-tune with train-time rows (Ray Train)."""

from rayattr.runconfig import job_main

if __name__ == "__main__":
    job_main("train")
