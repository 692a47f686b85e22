"""Ray layer: tests that run on the session's embedded Ray (``ray_session``) or call the Ray executors in process."""
