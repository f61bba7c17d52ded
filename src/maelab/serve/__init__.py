"""``maelab serve``: a small web page for interactive segmentation with a registered R-MAE (see ``app``)."""
