"""Template-matching particle picker, RELION's ``relion_autopick --ref``.

Re-derived from RELION 5 ``src/autopicker.cpp`` (``initialise``, ``autoPickOneMicrograph``,
``calculateStddevAndMeanUnderMask``, ``peakSearch``, ``prunePeakClusters``,
``removeTooCloselyNeighbouringPeaks``), computed in torch with every in-plane rotation of a reference in one
batch of FFT correlations (CPU or CUDA, the same code).

**References** (:func:`read_reference_images`, :func:`prepare_references`): 2D images from a STAR file
(``rlnReferenceImage`` or ``rlnImageName``), an ``.mrcs`` stack or a single 2D ``.mrc``; projections of a 3D map
at the HEALPix directions of ``healpix_order`` in the asymmetric unit of ``sym`` (:func:`reference_projections`,
psi = 0: in-plane rotations are searched separately); or RELION's Gaussian blob (:func:`gauss_reference`).
References with a pixel size ``apix_ref`` different from the micrograph's ``apix`` are resampled by Fourier
cropping/padding to ``2·round((b/2)·apix_ref/apix)`` pixels and, when enlarged, multiplied by ``b / new size``
(RELION's correction for references made from down-scaled, re-normalised particles). The particle diameter is
``--particle_diameter`` or, when negative, RELION's automatic value (on the central row of each reference, the
distance between the first and the last pixel that differ from the corner value, averaged, times
``apix_ref``). ``R = round(diameter / (2·apix)) − shrink_particle_mask`` (micrograph pixels) is the particle
radius: references are multiplied by the hard disc ``r² < R²`` and by −1 with ``invert``.

**Micrograph**: pixels with ``|x − μ|/σ > outlier_zscore`` are set to ``μ``, then ``x ← (x − μ)/σ`` (μ, σ of
the raw micrograph); a non-square micrograph is centred in an ``N × N`` square (``N`` = larger side) filled with
N(0, 1) noise (seeded). ``--highpass`` filters the micrograph (raised-cosine edge of 2 Fourier pixels).

**Work grid** (``--shrink``, ``--lowpass``): as the LoG picker (:func:`cryopipe.picking.log.log_work_size`):
size ``w`` (even, FFT-friendly), ``scale = w / N`` (float32). Map pixel ``q`` (row or column) is the square's
pixel ``q / scale``. The references are band-limited to ``|k| ≤ d/2`` with ``d = 2·round(N·apix/lowpass)``
(``N`` without lowpass), all frequencies in Fourier pixels of the ``N``-square, and to the work grid
(``|kx|, |ky| < w/2``; its Nyquist row and column are left out).

**Figure of merit** (per reference ``A``, per map pixel ``s``):

* local background statistics ``μ(s)``, ``σ(s)`` of the micrograph under the background mask (the pixels
  ``r² ≥ R²`` of the reference box, ``n_bg`` of them), by FFT correlation of the micrograph and its square with
  the mask on the work grid; ``σ = 1`` where the variance is ``≤ 1e-10`` (the ``_avgNoise`` / ``_stddevNoise``
  maps);
* correlation ``C_ψ(s) = Σ_x A_ψ(x)·X(s + x) / n`` (``n`` = number of pixels of the disc ``r² < R²``) for every
  in-plane angle ``ψ = j·360/round(360/ang)``, by FFT on the work grid. ``A_ψ`` is sampled in Fourier space at
  ``Aᵀk`` with ``A = euler_to_matrix(0, 0, ψ)`` (RELION's ``get2DFourierTransform``; bilinear interpolation of the
  reference's FT zero-padded 2×, with the gridding pre-correction ``sinc²`` per axis), multiplied by the
  micrograph's CTF with ``ctf`` (``−sin γ`` with B-factor envelope; 1 below the first peak with
  ``ctf_intact_first_peak``), so ``rlnAnglePsi`` follows RELION's particle convention;
* ``<A>``, ``<A²>``: sums of the real-space (band-limited, CTF-multiplied) ψ = 0 reference over the disc
  ``r² < R²`` divided by ``n + 1`` (as RELION);
* ``diff2 = (−2·C + 2·μ·S)/σ + <A²>``, ``P = exp(−diff2/2)`` (the likelihood ratio of "reference" against
  "empty", σ_noise = 1), ``E = exp(<A²>/2)`` and **FOM = (P − 1)/(E − 1)**, the best over ψ kept with its ψ
  (the ``_ref%03d_bestCCF`` / ``_bestPSI`` maps). FOM = 1 is the likelihood ratio of a median noisy copy of the
  reference itself.

  *Deviation (local-mean term):* RELION uses ``S = <A>`` (disc sum / (n + 1)), but ``C`` correlates the whole
  band-limited reference, which leaks out of the disc (strongly so after multiplication by a CTF), so a local
  offset μ of the micrograph (ice gradient, contamination) does not cancel and biases the FOM by ``∝ μ``
  (measured: up to 0.24 in FOM units inside a −1.5 σ patch of the fixture micrograph with ``--ctf``).
  Here ``S = Σ A / n`` over the whole reference (its DC coefficient, the same support and normalisation as ``C``),
  so that ``C − μ·S`` is exactly invariant to a constant offset. ``relion_mean_term=True`` restores RELION's
  term; for μ ≈ 0 (clean ice) both agree.

  *Deviation:* RELION's ``E`` adds a random term ``Σ 2·A·ξ`` (ξ ~ N(0, 1), one draw per micrograph) to the
  exponent's ``Σ A²``; its expectation is 0 and it only makes the FOM scale of each micrograph random (by
  ~10 % for typical references), so it is left out here: ``E`` is deterministic. ``P`` and the FOM are
  computed in float64 from the best correlation and stored as float32, clamped to ±3.4e38 (RELION overflows
  to inf on strong contamination).

**Peaks** (:func:`template_pick_from_maps`), per reference: map pixels inside the micrograph at least
``max(1, int((skip_side + box/2)·scale))`` work pixels from its edges with ``FOM ≥ threshold``, not rejected
by ``max_stddev_noise > 0 and σ > max_stddev_noise`` or ``min_avg_noise > −900 and μ < min_avg_noise``, and
local maxima against their 4 neighbours (with ``scale ≥ 1`` the neighbours must also reach the threshold).
:func:`prune_peak_clusters` (single-linkage clusters with link distance² ``< R²·scale²``; in each cluster the
best FOM is kept and cluster members closer than ``min_distance`` removed, repeatedly) runs per reference,
then on the union over the references; finally :func:`remove_close_neighbours` drops every peak whose nearest
neighbour is closer than ``min_distance`` (default ``box·apix/2`` Å). Coordinates
``(index − first index)/scale`` in micrograph pixels (RELION's ``FIRST_XMIPP_INDEX`` bookkeeping, as LoG);
``rlnClassNumber`` = reference number (1-based), ``rlnAnglePsi`` = best ψ.

**FOM maps** (:func:`write_template_maps` / :func:`read_template_maps`): one float32 MRC stack
``<base>_fom.mrcs`` per micrograph on the work grid (pixel size ``apix/scale``) with the sections listed in
:data:`MAP_SECTIONS` followed by ``ref001_bestCCF``, ``ref001_bestPSI``, ``ref002_bestCCF``, … (RELION's
per-reference maps, one file instead of ``2·R + 2`` files), and ``<base>_fom.star`` with the geometry needed
to pick from them (work and square sizes, micrograph shape, box, radius, diameter, pixel size), ``E`` per
reference and the settings that made the maps. Picking from re-read maps gives exactly the picks of a fresh
run (the fresh run also picks from the float32 maps it writes).

**Modules** (issue 14: the 1,058-line module split at its seams, everything re-exported here, behaviour
unchanged): :mod:`~cryopipe.picking.template_references` (references and their preparation),
:mod:`~cryopipe.picking.template_fom` (FOM maps), :mod:`~cryopipe.picking.template_peaks` (peaks, options, the
one-micrograph picker), :mod:`~cryopipe.picking.template_map_files` (FOM-map files and the job's picker).
"""

from __future__ import annotations

from cryopipe.picking.template_fom import MAP_SECTIONS, TemplateMaps, template_fom_maps
from cryopipe.picking.template_map_files import (
    make_template_picker,
    read_template_maps,
    template_maps_paths,
    write_template_maps,
)
from cryopipe.picking.template_peaks import (
    TemplateOptions,
    peak_search,
    prune_peak_clusters,
    remove_close_neighbours,
    template_pick,
    template_pick_from_maps,
)
from cryopipe.picking.template_references import (
    TemplateReferences,
    auto_particle_diameter,
    gauss_reference,
    prepare_references,
    psi_sampling,
    read_reference_images,
    reference_projections,
)

__all__ = [
    "TemplateReferences",
    "TemplateMaps",
    "TemplateOptions",
    "MAP_SECTIONS",
    "psi_sampling",
    "read_reference_images",
    "reference_projections",
    "gauss_reference",
    "auto_particle_diameter",
    "prepare_references",
    "template_fom_maps",
    "peak_search",
    "prune_peak_clusters",
    "remove_close_neighbours",
    "template_pick_from_maps",
    "template_pick",
    "write_template_maps",
    "read_template_maps",
    "template_maps_paths",
    "make_template_picker",
]

