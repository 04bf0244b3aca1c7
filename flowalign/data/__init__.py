"""Shipped data helpers.

* :mod:`flowalign.data.digits` -- the digits quickstart: 16x16 images from scikit-learn's
  ``load_digits``, deliberately flawed labels (``corrupt_labels``), train / held-out prompt
  templates and ``parse_digit``.
* :mod:`flowalign.data.images` -- source images of image-editing prompt records
  (``{"prompt": ..., "image": "a.png"}``): ``load_source_images``, path resolution, config checks.
"""
