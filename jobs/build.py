"""`ray job submit --working-dir . -- python jobs/build.py CONFIG.yaml`: rayattr build from a YAML run config."""

from rayattr.runconfig import job_main

if __name__ == "__main__":
    job_main("build")
