"""File formats: STAR (RELION 3.0 / 3.1+), MRC/MRCS, particles with optics groups, atomic writes.

Submodules: :mod:`cryopipe.io.atomic`, :mod:`cryopipe.io.star`, :mod:`cryopipe.io.mrc`,
:mod:`cryopipe.io.particles`. The most used functions are re-exported here.
"""

from cryopipe.io.atomic import atomic_path
from cryopipe.io.mrc import (
    ImageReader,
    MrcInfo,
    MrcStack,
    MrcStackWriter,
    format_image_name,
    mrc_info,
    parse_image_name,
    parse_image_names,
    read_mrc,
    write_mrc,
)
from cryopipe.io.particles import (
    ParticleData,
    ctf_parameters,
    euler_angles,
    optics_values,
    origins_px,
    pixel_sizes,
    read_particles,
    write_particles,
)
from cryopipe.io.star import read_star, read_star_with_version, star_version, write_star

__all__ = [
    "atomic_path", "read_star", "read_star_with_version", "write_star", "star_version", "read_mrc", "write_mrc",
    "mrc_info", "MrcInfo", "MrcStack", "MrcStackWriter", "ImageReader", "parse_image_name", "parse_image_names",
    "format_image_name", "ParticleData", "read_particles", "write_particles", "pixel_sizes", "ctf_parameters",
    "origins_px", "euler_angles", "optics_values",
]
