"""Selection of classes after 2D classification (``cryopipe select --classes``) and class-average galleries.

* :mod:`cryopipe.selection.classes` – pure functions: automatic class score, centre of mass / re-centring,
  sorting, regrouping of particles.
* :mod:`cryopipe.selection.files` – reading a classification run (optimiser/model/data STAR, class stack) and
  writing the Select-job outputs (:func:`~cryopipe.selection.files.select_classes`).
* :mod:`cryopipe.selection.gallery` – PNG gallery of class averages (also for the class2d job).
The ``--classes`` options and entry point are a job module, :mod:`cryopipe.jobs.select_classes` (used by
:mod:`cryopipe.jobs.select`). Nothing heavy is imported here.
"""
