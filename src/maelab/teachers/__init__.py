"""Frozen teachers for feature mimicking (MR-MAE, Gao et al.): CLIP (open_clip), DINO (timm) and maelab
encoders (local files or the MLflow registry), behind one interface (:class:`Teacher`)."""

from maelab.teachers.base import Teacher, TeacherOutput, resample_tokens
from maelab.teachers.build import TEACHERS, HubDownloadError, build_teacher, local_weights

__all__ = [
    "TEACHERS",
    "HubDownloadError",
    "Teacher",
    "TeacherOutput",
    "build_teacher",
    "local_weights",
    "resample_tokens",
]
