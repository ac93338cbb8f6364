"""The napari front end: a plugin (npe2 manifest ``napari.yaml``) built on the Python API.

- :mod:`~bundle.viewer.reader`: opens every stack the bundle reads (NIfTI, ITK formats, DeltaVision,
  TIFF with its voxel size) as an image layer whose ``scale`` is the voxel size (µm);
- :mod:`~bundle.viewer.sample`: a simulated widefield stack and its ground truth (generated, never
  downloaded);
- :mod:`~bundle.viewer.widgets`: the *Deconvolve*, *PSF* and *Train* dock widgets. They call
  :func:`bundle.inference.deconvolve`, :mod:`bundle.physics` and the bundle's training workflow (the
  same code as the command line) in napari thread workers, with progress bars and Cancel buttons.

Install with ``pip install -e ".[napari]"``; napari then lists *CycleGAN deconvolution* under
*Plugins*. Only :mod:`~bundle.viewer.widgets` needs napari and Qt; the reader and the sample data
are plain functions.
"""
