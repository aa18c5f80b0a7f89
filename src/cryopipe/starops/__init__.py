"""STAR-file operations with ``relion_star_handler``'s semantics (the ``cryopipe star`` command,
:mod:`cryopipe.jobs.star_tools`).

One operation per call (as ``relion_star_handler``), file in → file out (``--i in.star --o out.star``); no job
folder is made (RELION's star handler is a command-line tool, not a pipeline job):

* ``--center --center_X x --center_Y y --center_Z z`` (reference pixels, from the box centre): re-centre the
  particles on that point of the reference. With the RELION Euler matrix ``A`` of each particle,
  ``origin ← origin − pixel_size · (A·c)`` (x, y; and z when the file has ``rlnOriginZAngst``) — exactly
  ``relion_star_handler --center`` (RELION-3.1+ files: origins in Å, pixel size of the particle's optics group;
  RELION-3.0 files: ``rlnOriginX/Y`` in pixels are shifted in pixels). Tomography particles (RELION 4/5): the
  same with 3D origins and ``A`` = Euler(rlnAngle*) only (origins are in the subtomogram frame); optics without
  rlnImagePixelSize use rlnTomoTiltSeriesPixelSize × rlnTomoSubtomogramBinning.
* ``--select rlnX --minval a --maxval b``: keep rows with ``a ≤ value ≤ b`` (inclusive, as RELION 3.1+);
  ``--select_by_str rlnX --select_include s | --select_exclude s``: rows whose string contains / lacks ``s``.
  ``*_model.star`` files select from ``data_model_classes``, as RELION.
* ``--discard_on_stats [--discard_label rlnImageName --discard_sigma 4]``: compute the mean and standard deviation
  of every image; drop images whose mean or stddev lies ``sigma`` ensemble standard deviations or more from the
  ensemble average (strict inequalities, population statistics, as RELION).
* ``--split --nr_split N | --size_split M [--random_order --random_seed S]``: RELION's rule (only ``N``: size
  ``ceil(n/N)``; only ``M``: ``ceil(n/M)`` files; both: ``N`` files of ``M`` rows, the rest dropped); outputs
  ``<out>_split1.star``, ``<out>_split2.star``, ….
* ``--combine --i "a.star b.star" [--check_duplicates rlnImageName]``: concatenate tables (glob patterns
  allowed). Optics groups are merged by ``rlnOpticsGroupName`` the way RELION does: the first file's groups keep
  their numbers, a group of a later file with a new name is appended with number = its position in the list of
  distinct names, a group whose name was seen before is joined to it, and the particles' ``rlnOpticsGroup`` are
  renumbered; ``rlnGroupName`` of later files becomes ``optics<N>_<name>``; ``rlnGroupNumber`` is removed; optics
  columns present in only some files are filled (beam tilt 0, identity mag. matrix, not CTF-premultiplied), and
  only columns present in every file are kept (others are dropped with a warning). *Deviation*: two groups with
  the same name but different pixel size / voltage / Cs / amplitude contrast / image size are an error here
  (RELION joins them silently, which corrupts the CTF of one data set).
* ``--remove_duplicates D [--image_angpix a]``: particles of the same micrograph (``rlnMicrographName`` or
  ``rlnTomoName``) whose centres ``rlnCoordinate − origin_Å/a`` lie within ``D`` Å (``D/a`` pixels) of a *later*
  particle are removed (RELION's rule: the last one of a cluster survives); ``a`` defaults to the pixel size of the
  first optics group. The removed rows go to ``<out>_removed.star``.
* ``--convert [--output_version 3.0|3.1]``: full RELION-3.0 ↔ 3.1 conversion (:mod:`cryopipe.io.particles`;
  ``relion_convert_star`` for 3.0 → 3.1); default target: the other layout of the input.
* ``--downgrade [--o out]``: RELION 3.1 → the 3.0 table that Warp/M read for sub-tomogram re-extraction, with the
  semantics of ``dynamo2m``'s ``relion_star_downgrade``: optics merged into the particles,
  ``rlnCoordinate{X,Y,Z} ← rlnCoordinate − rlnOrigin{X,Y,Z}Angst / rlnImagePixelSize`` and only the columns
  ``rlnMicrographName, rlnCoordinateX, rlnCoordinateY, rlnCoordinateZ, rlnAngleRot, rlnAngleTilt, rlnAnglePsi``
  (one unnamed ``data_`` block, no version line). Default output ``<stem>_rln3.0.star`` next to the input. 2D
  files (no ``rlnCoordinateZ``) give X/Y only; absent origins count as 0; ``--coord_angpix`` divides the origins
  by that pixel size instead of ``rlnImagePixelSize`` (for coordinates in another pixel size).

Every other block of the input (``data_optics``, general tables) and its STAR version line are kept. The table
operated on is ``data_particles`` / ``data_micrographs`` / ``data_movies`` / the unnamed ``data_`` block /
``data_model_classes``, or the one named by ``--i_tablename``.

Modules: :mod:`~cryopipe.starops.document` (the file read for editing), :mod:`~cryopipe.starops.tables` (the
operations on tables) and :mod:`~cryopipe.starops.files` (file in → file out). Python API: the pure table functions
(:func:`recenter_table`, :func:`select_range_mask`, :func:`select_str_mask`,
:func:`split_indices`, :func:`duplicate_mask`, :func:`image_stats_mask`, :func:`combine_tables`,
:func:`downgrade_table`) and the file-level ones (:func:`center_star`, :func:`select_star`, :func:`split_star`,
:func:`combine_stars`, :func:`remove_duplicates_star`, :func:`discard_on_stats_star`, :func:`convert_star`,
:func:`downgrade_star`).
"""

from cryopipe.starops.document import StarDoc, read_doc
from cryopipe.starops.files import (
    CombineResult,
    DuplicateResult,
    SelectResult,
    center_star,
    combine_stars,
    convert_star,
    discard_on_stats_star,
    downgrade_output_path,
    downgrade_star,
    image_stats,
    remove_duplicates_star,
    select_star,
    split_star,
)
from cryopipe.starops.tables import (
    combine_tables,
    downgrade_table,
    duplicate_mask,
    image_stats_mask,
    particle_centres,
    recenter_table,
    select_range_mask,
    select_str_mask,
    split_indices,
)

__all__ = [
    "StarDoc", "read_doc", "CombineResult", "DuplicateResult", "SelectResult", "center_star", "combine_stars",
    "convert_star", "discard_on_stats_star", "downgrade_output_path", "downgrade_star", "image_stats",
    "remove_duplicates_star", "select_star", "split_star", "combine_tables", "downgrade_table", "duplicate_mask",
    "image_stats_mask", "particle_centres", "recenter_table", "select_range_mask", "select_str_mask", "split_indices",
]
