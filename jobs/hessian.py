"""`ray job submit --working-dir . -- python jobs/hessian.py CONFIG.yaml`: rayattr hessian from a YAML run config."""

from rayattr.runconfig import job_main

if __name__ == "__main__":
    job_main("hessian")
