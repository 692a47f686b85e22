"""`ray job submit --working-dir . -- python jobs/report.py CONFIG.yaml`: the static HTML report of a scored run."""

from rayattr.runconfig import job_main

if __name__ == "__main__":
    job_main("report")
