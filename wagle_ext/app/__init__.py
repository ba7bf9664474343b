"""The application: the ``wagle`` command line (``cli``), its job configs (``config``), the embedded
benchmark it runs without downloads (``embedded_benchmark``) and that benchmark's synthetic data
(``fictitious_authors``). The top layer: it may import every other layer, and none imports it."""
