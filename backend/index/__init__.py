"""A reusable text-and-image index of whole rasters: windows embedded once, searched in milliseconds.

``layout`` holds the on-disk format (a folder: ``index.json`` + LanceDB tables), ``rasters`` opens and
reads rasters (validation, block-aligned strips, valid-pixel shares, footprints), ``build`` runs the
resumable build, ``identity`` says which model made the embeddings, ``query`` turns texts, chips and
example polygons into a query vector and searches or renders a score surface, ``export`` writes
GeoParquet, ``service`` serves the ``index_*`` operations, ``ray_build`` runs the build on Ray Data.
"""
