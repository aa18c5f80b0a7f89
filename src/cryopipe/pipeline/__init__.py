"""RELION project bookkeeping shared by all jobs.

* :mod:`cryopipe.pipeline.project` – ``default_pipeline.star``, job folders ``Type/jobNNN/``, ``job.star``,
  exit markers, aliases, the ``--o`` rule (:func:`~cryopipe.pipeline.project.open_job_dir`).
* :mod:`cryopipe.pipeline.log` – timestamped log lines and progress bars (terminal + ``run.out``).
"""
