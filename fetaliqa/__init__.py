"""fetaliqa: frame selection and fetal abdomen segmentation for ACOUSLIC-AI blind sweeps.

Arrays in, arrays out. Axis order of every stack is ``(frames, rows, cols)`` as returned by
``SimpleITK.GetArrayFromImage``; frame indices are 0-based and ``-1`` means "no frame".
Lengths are in millimetres; the challenge's pixel size is 0.28 mm.
"""

__version__ = "0.1.0"
