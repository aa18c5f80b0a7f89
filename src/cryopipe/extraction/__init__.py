"""Particle extraction (RELION ``relion_preprocess --extract``): windowing, rescaling, normalisation.

Public API: :func:`extract_particles`, :func:`extract_windows`, :func:`preprocess_particles`,
:func:`normalise`, :func:`reextract_geometry` and helpers; the ``cryopipe extract`` job is
:mod:`cryopipe.jobs.extract`.
"""

from cryopipe.extraction.extract import (
    FLOAT16_MIN_NORMAL,
    default_bg_radius,
    extract_particles,
    extract_windows,
    flush_float16_subnormals,
    output_pixel_size,
    preprocess_particles,
    reextract_geometry,
    relion_round,
    rescale_images,
    rewindow_images,
    window_corners,
)
from cryopipe.extraction.normalise import (
    background_mask,
    background_stats,
    invert_contrast,
    normalise,
    remove_dust,
    subtract_background_ramp,
)

__all__ = [
    "FLOAT16_MIN_NORMAL",
    "background_mask",
    "background_stats",
    "default_bg_radius",
    "extract_particles",
    "extract_windows",
    "flush_float16_subnormals",
    "invert_contrast",
    "normalise",
    "output_pixel_size",
    "preprocess_particles",
    "reextract_geometry",
    "relion_round",
    "remove_dust",
    "rescale_images",
    "rewindow_images",
    "subtract_background_ramp",
    "window_corners",
]
